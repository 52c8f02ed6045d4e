"""train-cam through the CLI: a real (tiny) run, exact resume, config handling, bad input."""
import csv
import json

import pytest
import torch
import yaml

from amrseg.cli import main
from amrseg.errors import AmrsegError

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
    from amrseg.engine.train import train as train_cam

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


# --------------------------------------------------------------------------- issue 13


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v))


def test_a_folder_with_run_files_but_no_checkpoint_is_refused(tiny_voc, tmp_path, capsys):
    # A run killed before its first checkpoint leaves config.yaml and log.csv: a new run there
    # would overwrite the user's files.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("mine\n")
    (run / "log.csv").write_text("step\n")
    assert _train(tiny_voc, run, epochs=1) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.yaml" in err and "--out" in err
    assert (run / "config.yaml").read_text() == "mine\n" and (run / "log.csv").read_text() == "step\n"


@pytest.mark.parametrize("args, needle", [
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "-1"], "--lr -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--epochs", "0"], "--epochs 0"),
    (["--set", "loss.cps_weight=.nan"], "--set loss.cps_weight=.nan"),
    (["--set", "loss.area_weight=-.inf"], "--set loss.area_weight=-.inf"),
    (["--set", "train.log_every=0"], "--set train.log_every=0"),
    (["--set", "train.num_workers=-1"], "--set train.num_workers=-1"),
    (["--set", "amm.reduction=0"], "--set amm.reduction=0"),
    (["--set", "amm.eps=0"], "--set amm.eps=0"),
    (["--set", "train.momentum=1.5"], "--set train.momentum=1.5"),
    (["--set", "train.checkpoint_every=-3"], "--set train.checkpoint_every=-3"),
    (["--set", "train.checkpoint_minutes=.inf"], "--set train.checkpoint_minutes=.inf"),
    (["--set", "data.scale_range=[0.5, .nan]"], "data.scale_range"),
])
def test_every_config_value_is_checked_and_names_what_was_typed(tiny_voc, tmp_path, capsys, args, needle):
    assert _train(tiny_voc, tmp_path / "r", extra=args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_flag_overridden_by_set_is_blamed_on_the_set(tiny_voc, tmp_path, capsys):
    assert _train(tiny_voc, tmp_path / "r", extra=["--set", "train.batch_size=0"]) == 2
    assert "--set train.batch_size=0" in capsys.readouterr().err  # SMALL passes --batch-size 4 too


def test_device_cuda_without_cuda_is_one_line(tiny_voc, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _train(tiny_voc, tmp_path / "r", extra=["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "CUDA" in err


@pytest.mark.parametrize("lr", ["1e30", "1e6"])
def test_diverging_run_stops_and_keeps_only_finite_state(tiny_voc, tmp_path, capsys, lr):
    run = tmp_path / "r"
    assert _train(tiny_voc, run, epochs=20, extra=["--lr", lr]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not finite" in err and "stopped" in err
    assert not (run / "model.pt").exists()
    if "last good checkpoint kept" in err:  # it names the checkpoint: that checkpoint is finite
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        assert f"(step {ckpt['step']})" in err
        assert _all_finite(ckpt["model"])
    else:
        assert "no checkpoint was written" in err and not (run / "checkpoint.pt").exists()


class _StepData(torch.utils.data.Dataset):
    """One item per step (batch = the dataset): x = 0 in epochs 0-1, 1e30 in epoch 2."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return (torch.tensor([1e30 if self.epoch == 2 else 0.0]),)


def _toy_cfg(tmp_path, **train):
    from amrseg.config import Config, merge

    train = {"epochs": 4, "batch_size": 2, "lr": 1e9, "momentum": 0.0, "weight_decay": 0.0, "num_workers": 0,
             "device": "cpu", "log_every": 1, **train}
    return merge(Config(), {"split": "toy", "train": train})


def test_parameters_that_overflow_in_the_update_stop_the_run(tmp_path):
    # The loss of step 3 is finite (w = 0), its gradient 1e30 x lr 1e9 overflows the weight:
    # the parameter check after the step stops the run, the step-3 state is never saved.
    from amrseg.engine.trainer import Job, fit

    w = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.w = w
    job = Job(name="toy", model=model, param_groups=[{"params": [w], "initial_lr": 1e9}], dataset=_StepData(),
              losses=lambda net, batch: {"total": (net.w * batch[0]).sum()})
    cfg = _toy_cfg(tmp_path, checkpoint_every=1)
    with pytest.raises(AmrsegError) as err:
        fit(job, cfg, tmp_path / "toy")
    msg = str(err.value)
    assert msg.startswith("step 3: w is not finite after the update") and "(step 2)" in msg, msg
    ckpt = torch.load(tmp_path / "toy" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and torch.equal(ckpt["model"]["w"], torch.zeros(1))
    assert not (tmp_path / "toy" / "model.pt").exists()


def _saved_steps(monkeypatch):
    import amrseg.engine.trainer as trainer

    steps, real = [], trainer.atomic_torch_save
    monkeypatch.setattr(trainer, "atomic_torch_save",
                        lambda obj, path: (steps.append(obj["step"]) if "optimizer" in obj else None, real(obj, path)))
    return steps


def _cam_cfg(tiny_voc, extra=(), epochs=1, batch_size=1):
    from amrseg.config import resolve

    flags = {"data_root": str(tiny_voc.resolve()), "split": "train",
             "model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"},
             "train": {"epochs": epochs, "batch_size": batch_size, "device": "cpu"}, "data": {"crop": 32}}
    return resolve("cam", flags, ["train.num_workers=0", "train.log_every=1", *extra])


def test_checkpoint_every_n_steps(tiny_voc, tmp_path, monkeypatch):
    from amrseg.engine.train import train as train_cam

    steps = _saved_steps(monkeypatch)
    # 8 images, batch 1: 8 steps per epoch; every 3 steps, plus each epoch's end.
    train_cam(_cam_cfg(tiny_voc, ["train.checkpoint_every=3", "train.checkpoint_minutes=0"], epochs=2),
              tmp_path / "r")
    assert steps == [3, 6, 8, 9, 12, 15, 16]


def test_checkpoint_every_ten_minutes_of_wall_time(tiny_voc, tmp_path, monkeypatch):
    import amrseg.engine.trainer as trainer
    from amrseg.engine.train import train as train_cam

    steps = _saved_steps(monkeypatch)
    now = [0.0]

    def clock():  # every look at the clock: 4 more minutes
        now[0] += 240.0
        return now[0]

    monkeypatch.setattr(trainer, "clock", clock)
    train_cam(_cam_cfg(tiny_voc), tmp_path / "a")  # default: train.checkpoint_minutes=10
    # start t=240; step k looks at 240 + 240 k until >= 600 s have passed: steps 3 and 6 (the
    # save itself looks once more), and the epoch's end at 8.
    assert steps == [3, 6, 8]
    steps.clear()
    train_cam(_cam_cfg(tiny_voc, ["train.checkpoint_minutes=0"]), tmp_path / "b")
    assert steps == [8]


_KILL_SCRIPT = r"""
import os, signal, sys
import torch
real_save = torch.save

def save(obj, f, *args, **kwargs):
    # kill -9 in the middle of writing the step-8 checkpoint: a half-written temp file stays behind
    if isinstance(obj, dict) and obj.get("step") == 8 and "optimizer" in obj:
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
from amrseg.cli import main
from amrseg.errors import AmrsegError
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_epoch_then_resume_is_bit_exact(tiny_voc, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    # 8 images, batch 2: 4 steps per epoch, 3 epochs; checkpoints at 3, 4, 6, then killed while
    # writing step 8's: the run resumes from step 6, half-way through epoch 2.
    args = ["train-cam", "--data", str(tiny_voc), "--split", "train", "--preset", "amr", "--epochs", "3",
            "--backbone", "resnet18", "--base-width", "8", "--pretrained", "none", "--crop", "32",
            "--batch-size", "2", "--device", "cpu", "--set", "train.num_workers=0", "--set", "train.log_every=1",
            "--set", "train.checkpoint_every=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process: the same sums
    proc = subprocess.run([sys.executable, "-m", "amrseg", *args, "--out", str(full)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *args, "--out", str(part)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 6
    temps = [p.name for p in part.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".checkpoint.pt.")
    assert not (part / "model.pt").exists()

    # a new process, as after a real kill -9: the dead writer's temp file is stale for it
    proc = subprocess.run([sys.executable, "-m", "amrseg", *args, "--out", str(part), "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in part.iterdir() if p.name.endswith(".tmp")]  # the stale temp file is gone
    a = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [int(r["step"]) for r in csv.DictReader(open(part / "log.csv"))] == list(range(1, 13))


def test_a_disk_too_small_for_the_checkpoints_is_found_before_training(tiny_voc, tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert _train(tiny_voc, tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MiB free" in err and "--out" in err
    assert not (tmp_path / "r" / "log.csv").exists()


def test_pretrained_text_file_is_not_a_weights_file(tiny_voc, tmp_path, capsys):
    text = tmp_path / "weights.pt"
    text.write_text("hello, I am not a checkpoint\n")
    assert main(["train-cam", "--data", str(tiny_voc), "--split", "train", "--preset", "cam", "--out",
                 str(tmp_path / "r"), "--pretrained", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pretrained" in err and "not a PyTorch weights file" in err


def test_tensorboard_missing_is_one_line_naming_the_extra(tiny_voc, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert _train(tiny_voc, tmp_path / "r", extra=["--set", "train.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'tensorboard' extra" in err and "amrseg[tensorboard]" in err
    assert not (tmp_path / "r" / "log.csv").exists()


def test_tensorboard_writes_every_logged_scalar(tiny_voc, tmp_path):
    pytest.importorskip("tensorboard", reason="the 'tensorboard' extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    assert _train(tiny_voc, run, epochs=2, extra=["--set", "train.tensorboard=true",
                                                  "--set", "train.val_split=val"]) == 0
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/loss", "loss/cls", "loss/cls_s", "loss/cls_c", "loss/cps", "train/lr", "train/images_per_s",
            "val/map"} <= tags
    rows = list(csv.DictReader(open(run / "log.csv")))
    # the same figures as log.csv, step for step
    for tag, col in (("loss/cls", "cls"), ("train/lr", "lr")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [int(r["step"]) for r in rows]
        assert [e.value for e in events] == pytest.approx([float(r[col]) for r in rows], rel=1e-4)
    assert [e.step for e in acc.Scalars("val/map")] == [2, 4]


def test_val_split_logs_map_each_epoch_and_changes_nothing_else(tiny_voc, tmp_path):
    assert _train(tiny_voc, tmp_path / "plain", epochs=2) == 0
    assert _train(tiny_voc, tmp_path / "val", epochs=2, extra=["--set", "train.val_split=val"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "val" / "log.csv")))
    assert [r["val_map"] for r in rows][0] == ""  # step 1 is mid-epoch
    figures = {int(r["step"]): float(r["val_map"]) for r in rows if r["val_map"]}
    assert sorted(figures) == [2, 4] and all(0.0 < v <= 1.0 for v in figures.values())
    # never used for model selection: the weights are those of the run without validation
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "val" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_val_split_that_does_not_exist_is_one_line(tiny_voc, tmp_path, capsys):
    assert _train(tiny_voc, tmp_path / "r", extra=["--set", "train.val_split=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.val_split" in err and "nope" in err
