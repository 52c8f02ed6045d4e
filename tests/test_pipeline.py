"""`amrseg run`: an experiment file's steps in order, skipped when finished, resumed when not, with a report;
and the one run loader's wrong-kind error from every command."""
import json

import yaml

from amrseg.cli import main

NET = {"backbone": "resnet18", "base_width": 8, "pretrained": "none"}
TRAIN = {"epochs": 2, "batch_size": 4, "num_workers": 0, "log_every": 1, "device": "cpu"}


def _experiment(tmp_path, root, cam_epochs=2):
    spec = {
        "description": "tiny",
        "vars": {"data": {"root": str(root)}, "threshold_hi": 0.3},
        "steps": [
            {"stage": "train-cam", "out": "cam", "preset": "cam", "data_root": "${data.root}", "split": "train",
             "model": NET, "data": {"crop": 32}, "train": {**TRAIN, "epochs": cam_epochs}},
            {"stage": "make-cam", "run": "cam", "data": "${data.root}", "split": "train", "out": "cams",
             "scales": [1.0], "device": "cpu"},
            {"stage": "eval-cam", "cams": "cams", "data": "${data.root}", "split": "train", "sweep": "0.1:0.5:0.1",
             "out": "cam.json"},
            {"stage": "visualize", "cams": "cams", "data": "${data.root}", "split": "train", "out": "gallery",
             "limit": 3, "metrics": "cam.json"},
            {"stage": "pseudo-labels", "name": "ir-labels", "cams": "cams", "data": "${data.root}", "split": "train",
             "out": "ir", "method": "crf", "crf": False, "workers": 0, "fg_threshold": "${threshold_hi}"},
        ],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _report(exp):
    return json.loads((exp / "report.json").read_text())


def test_run_writes_every_step_and_a_report(tiny_voc, tmp_path, capsys):
    path = _experiment(tmp_path, tiny_voc)
    exp = tmp_path / "exp"
    assert main(["run", str(path), "--out", str(exp)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["status"] for s in summary["steps"]] == ["done"] * 5
    report = _report(exp)
    stages = {s["name"]: s for s in report["stages"]}
    cam = json.loads((exp / "cam.json").read_text())
    assert stages["eval-cam"]["summary"]["miou"] == cam["miou"]  # the figure in the report is the stage's own
    assert stages["ir-labels"]["config"]["fg_threshold"] == 0.3  # the variable reached the step
    assert (exp / "cams" / "config.yaml").is_file() and (exp / "ir" / "config.yaml").is_file()
    assert "provenance" in report and (exp / "report.html").is_file()
    # A second run skips every finished step and reports the same figures.
    assert main(["run", str(path), "--out", str(exp)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["status"] for s in again["steps"]] == ["skipped (finished)"] * 5
    assert {s["name"]: s["summary"] for s in _report(exp)["stages"]} == {n: s["summary"] for n, s in stages.items()}


def test_an_interrupted_run_finishes_with_the_same_figures(tiny_voc, tmp_path, capsys, monkeypatch):
    path = _experiment(tmp_path, tiny_voc)
    assert main(["run", str(path), "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    # Interrupted in the middle of make-cam: one CAM file written, then the process dies.
    import amrseg.stages.make_cam as stage

    real, calls = stage.save_cam, []

    def dying(path, **kw):
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real(path, **kw)

    monkeypatch.setattr(stage, "save_cam", dying)
    part = tmp_path / "part"
    assert main(["run", str(path), "--out", str(part)]) == 130
    assert len(list((part / "cams").glob("*.npz"))) == 1 and not (part / "steps" / "make-cam.json").exists()
    monkeypatch.setattr(stage, "save_cam", real)
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(part)]) == 0
    steps = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"]
    assert [s["status"] for s in steps] == ["skipped (finished)"] + ["done"] * 4
    whole, resumed = _report(tmp_path / "whole"), _report(part)
    figures = lambda r: {s["name"]: s["summary"].get("miou") for s in r["stages"]}  # noqa: E731
    assert figures(resumed) == figures(whole)
    assert _report(part)["stages"][1]["summary"]["skipped"] == 1  # make-cam kept the file written before


def test_a_training_killed_before_its_first_checkpoint_starts_again(tiny_voc, tmp_path, capsys):
    path = _experiment(tmp_path, tiny_voc)
    whole = tmp_path / "whole"
    assert main(["run", str(path), "--out", str(whole), "--until", "train-cam"]) == 0
    # What a kill -9 before the first checkpoint leaves: the run's config and the first log rows.
    part = tmp_path / "part"
    (part / "cam").mkdir(parents=True)
    for name in ("config.yaml", "log.csv"):
        (part / "cam" / name).write_bytes((whole / "cam" / name).read_bytes())
    assert main(["run", str(path), "--out", str(part), "--until", "train-cam"]) == 0
    losses = lambda run: [row.rsplit(",", 1)[0] for row in (run / "log.csv").read_text().splitlines()]  # noqa: E731
    assert losses(part / "cam") == losses(whole / "cam")  # trained again from the start (images/s aside)
    # ... but a folder holding another config is not thrown away.
    other = tmp_path / "other"
    (other / "cam").mkdir(parents=True)
    (other / "cam" / "config.yaml").write_text((whole / "cam" / "config.yaml").read_text().replace(
        "epochs: 2", "epochs: 5"))
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(other), "--until", "train-cam"]) == 2
    assert "differs from this command (train.epochs: 5 -> 2)" in capsys.readouterr().err
    assert (other / "cam" / "config.yaml").exists()


def test_until_and_set_and_a_changed_step_is_refused(tiny_voc, tmp_path, capsys):
    path = _experiment(tmp_path, tiny_voc)
    exp = tmp_path / "exp"
    assert main(["run", str(path), "--out", str(exp), "--until", "eval-cam"]) == 0
    steps = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"]
    assert [s["name"] for s in steps] == ["train-cam", "make-cam", "eval-cam"]
    # A finished step whose config changed is refused, naming the difference.
    assert main(["run", str(path), "--out", str(exp), "--set", "eval-cam.sweep=0.1:0.3:0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step eval-cam: finished with another config (sweep" in err
    # Unknown keys are one-line errors too.
    for bad, text in ((["--set", "make-cam.nosuch=1"], "unknown config key 'nosuch'"),
                      (["--set", "nosuch=1"], "--set nosuch: neither a step name"),
                      (["--until", "nosuch"], "--until nosuch: no step")):
        assert main(["run", str(path), "--out", str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, err


def test_a_stage_rerun_with_a_changed_threshold_is_refused(tiny_voc, tmp_path, capsys):
    path = _experiment(tmp_path, tiny_voc)
    exp = tmp_path / "exp"
    assert main(["run", str(path), "--out", str(exp)]) == 0
    capsys.readouterr()
    assert main(["pseudo-labels", "--cams", str(exp / "cams"), "--data", str(tiny_voc), "--split", "train", "--out",
                 str(exp / "ir"), "--method", "crf", "--no-crf", "--workers", "0", "--fg-threshold", "0.4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "made with other settings: fg_threshold 0.3 -> 0.4" in err


def test_every_stage_command_takes_set(tiny_voc, tmp_path, capsys):
    path = _experiment(tmp_path, tiny_voc)
    exp = tmp_path / "exp"
    assert main(["run", str(path), "--out", str(exp), "--until", "make-cam"]) == 0
    capsys.readouterr()
    base = ["eval-cam", "--cams", str(exp / "cams"), "--data", str(tiny_voc), "--split", "train"]
    assert main([*base, "--threshold", "0.3"]) == 0
    by_flag = json.loads(capsys.readouterr().out)
    assert main([*base, "--set", "threshold=0.3"]) == 0
    assert json.loads(capsys.readouterr().out) == by_flag and by_flag["threshold"] == 0.3
    assert main([*base, "--set", "nosuch=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amrseg: error: unknown config key 'nosuch' (valid: cams, data, split, threshold")
    assert main([*base, "--set", "threshold=-1", "--sweep", "0.1:0.2:0.1"]) == 2
    assert capsys.readouterr().err.strip() == "amrseg: error: --sweep and --threshold: give one of them"


def test_packaged_experiments_resolve(tmp_path, capsys, monkeypatch):
    from amrseg.pipeline import EXPERIMENT_DIR, find_experiment, list_experiments, plan

    packaged_demo = EXPERIMENT_DIR / "demo.yaml"

    names = [n for n, _ in list_experiments()]
    assert "demo" in names
    assert main(["run", "--list"]) == 0 and "demo" in capsys.readouterr().out
    for name in names:
        spec = yaml.safe_load(find_experiment(name).read_text())
        sets = ["data.root=/data/VOC2012"] if "root" in (spec.get("vars") or {}).get("data", {}) else []
        steps = plan(spec, tmp_path, sets, name)  # every step's config resolves and validates
        assert len({s.name for s in steps}) == len(steps)
    assert main(["run", "nosuch", "--out", str(tmp_path / "x")]) == 2
    assert "not a file nor a packaged experiment (known: " in capsys.readouterr().err
    # `make demo` run again where its folder `demo` now is: the name is still the packaged experiment
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert find_experiment("demo") == find_experiment(str(packaged_demo))
    (tmp_path / "mine.yaml").mkdir()
    assert main(["run", "mine.yaml", "--out", str(tmp_path / "y")]) == 2
    assert "EXPERIMENT mine.yaml: no such file" in capsys.readouterr().err


def test_the_wrong_kind_of_run_is_one_line_everywhere(tiny_voc, tmp_path, capsys):
    cam = tmp_path / "cam"
    assert main(["train-cam", "--data", str(tiny_voc), "--split", "train", "--preset", "cam", "--out", str(cam),
                 "--epochs", "1", "--backbone", "resnet18", "--base-width", "8", "--pretrained", "none",
                 "--crop", "32", "--batch-size", "4", "--device", "cpu", "--set", "train.num_workers=0"]) == 0
    capsys.readouterr()
    (tmp_path / "irn").mkdir()
    (tmp_path / "irn" / "config.yaml").write_text("kind: irn\n")
    cases = [
        (["make-cam", "--run", str(tmp_path / "irn"), "--data", str(tiny_voc), "--out", str(tmp_path / "c")],
         f"--run {tmp_path / 'irn'}: a train-irn run, expected a train-cam run"),
        (["predict", "--run", str(cam), "--input", str(tiny_voc / "JPEGImages"), "--out", str(tmp_path / "p")],
         f"--run {cam}: a train-cam run, expected a train-seg run"),
        (["eval-seg", "--run", str(cam), "--data", str(tiny_voc), "--split", "val"],
         f"--run {cam}: a train-cam run, expected a train-seg run"),
        (["pseudo-labels", "--cams", str(tmp_path), "--data", str(tiny_voc), "--split", "val", "--out",
          str(tmp_path / "pm"), "--method", "irn", "--irn", str(cam)], None),
    ]
    for argv, text in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        if text:
            assert err == f"amrseg: error: {text}"
