"""train-cam through the CLI: a real (tiny) run, exact resume, config handling, bad input."""
import csv
import json

import pytest
import torch
import yaml

from amrseg.cli import main

SMALL = ["--backbone", "resnet18", "--base-width", "8", "--pretrained", "none", "--crop", "32",
         "--batch-size", "4", "--device", "cpu", "--set", "train.num_workers=0", "--set", "train.log_every=1"]


def _train(root, out, preset="amr", epochs=2, extra=()):
    return main(["train-cam", "--data", str(root), "--split", "train", "--preset", preset, "--out", str(out),
                 "--epochs", str(epochs), *SMALL, *extra])


def test_two_step_run_writes_the_contract_files(tiny_voc, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_voc, run, epochs=1) == 0  # 8 images / batch 4 = 2 steps
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"finished": True, "step": 2, "total_steps": 2, "model": str(run / "model.pt")}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["preset"] == "amr" and cfg["model"]["base_width"] == 8 and cfg["amm"]["placement"] == "stage"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["epoch"] == 1
    model = torch.load(run / "model.pt", weights_only=True)
    assert model["class_names"] == ["background", "square", "disc"]
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "cls", "cls_s", "cls_c", "cps", "lr", "images_per_s"):
            assert float(r[k]) >= 0
    # poly decay: step 1 trains at the base lr, step 2 at base * (1 - 1/2) ** 0.9
    assert float(rows[0]["lr"]) == pytest.approx(0.01)
    assert float(rows[1]["lr"]) == pytest.approx(0.01 * 0.5 ** 0.9, rel=1e-4)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_voc, tmp_path):
    from amrseg.config import resolve
    from amrseg.engine.train_cam import train_cam

    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(tiny_voc, full, epochs=2) == 0
    flags = {"data_root": str(tiny_voc.resolve()), "split": "train",
             "model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"},
             "train": {"epochs": 2, "batch_size": 4, "device": "cpu"}, "data": {"crop": 32}}
    cfg = resolve("amr", flags, ["train.num_workers=0", "train.log_every=1"])
    # Interrupted mid-epoch (after 3 of 4 steps), then resumed through the CLI.
    first = train_cam(cfg, part, stop_after_steps=3)
    assert first == {"finished": False, "step": 3, "total_steps": 4, "checkpoint": str(part / "checkpoint.pt")}
    assert not (part / "model.pt").exists()
    assert _train(tiny_voc, part, epochs=2, extra=["--resume"]) == 0
    a = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [int(r["step"]) for r in csv.DictReader(open(part / "log.csv"))]
    assert steps == [1, 2, 3, 4]


def test_existing_run_needs_resume_and_resume_rejects_changed_flags(tiny_voc, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_voc, run, epochs=1) == 0
    capsys.readouterr()
    assert _train(tiny_voc, run, epochs=1) == 2
    assert "--resume" in capsys.readouterr().err
    assert _train(tiny_voc, run, epochs=1, extra=["--resume", "--set", "loss.cps_weight=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss.cps_weight" in err


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tiny_voc, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_voc, run, epochs=1) == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    # A huge learning rate sends the weights to inf within a few steps.
    code = _train(tiny_voc, tmp_path / "nan", epochs=20, extra=["--lr", "1e12"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "loss is" in err
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.nope=1"], "train.nope"),
    (["--set", "amm.placement=everywhere"], "amm.placement"),
    (["--set", "train.lr=fast"], "train.lr"),
])
def test_bad_config_is_one_line(tiny_voc, tmp_path, capsys, args, needle):
    assert _train(tiny_voc, tmp_path / "r", extra=args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_amr_official_without_init_spotlight_is_an_error(tiny_voc, tmp_path, capsys):
    assert _train(tiny_voc, tmp_path / "r", preset="amr-official") == 2
    assert "--init-spotlight" in capsys.readouterr().err


def test_amr_official_trains_from_a_cam_run(tiny_voc, tmp_path):
    assert _train(tiny_voc, tmp_path / "cam", preset="cam", epochs=1) == 0
    assert _train(tiny_voc, tmp_path / "off", preset="amr-official", epochs=1,
                  extra=["--init-spotlight", str(tmp_path / "cam")]) == 0
    cam = torch.load(tmp_path / "cam" / "model.pt", weights_only=True)["state_dict"]
    off = torch.load(tmp_path / "off" / "model.pt", weights_only=True)["state_dict"]
    # the spotlight backbone was initialised from the cam run and stayed frozen
    for k, v in cam.items():
        if k.startswith("spotlight.") and "classifier" not in k and "num_batches" not in k:
            assert torch.equal(v, off[k]), k


def test_determinism_under_a_seed(tiny_voc, tmp_path):
    assert _train(tiny_voc, tmp_path / "a", epochs=1) == 0
    assert _train(tiny_voc, tmp_path / "b", epochs=1) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
