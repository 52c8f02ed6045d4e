"""train-cam and make-cam under torchrun with 2 CPU processes (gloo), against one process; a refused
make-cam under torchrun.

The commands are run exactly as the README writes them (`torchrun --standalone --nproc_per_node 2
-m amrseg ...`, with `--run-dir`, which torchrun passes through where it would swallow `--run`).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from amrseg.cli import main
from amrseg.models.resnet import build_resnet

SMALL = ["--backbone", "resnet18", "--base-width", "8", "--crop", "32", "--batch-size", "4", "--epochs", "1",
         "--lr", "0.01", "--seed", "0"]


def torchrun(*args, cwd):
    """`torchrun --standalone --nproc_per_node 2 -m amrseg ARGS` (torchrun = python -m torch.distributed.run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "amrseg",
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def pretrained(tmp_path):
    """Fixed weights: with them BatchNorm uses its running statistics, so the gradient of a batch
    split over two processes and averaged equals the gradient of the whole batch."""
    torch.manual_seed(0)
    path = tmp_path / "backbone.pt"
    torch.save(build_resnet("resnet18", base_width=8).state_dict(), path)
    return path


def test_torchrun_train_cam_and_make_cam_equal_one_process(tiny_voc, tmp_path, pretrained, capsys):
    single, double = tmp_path / "one", tmp_path / "two"
    common = ["--data", tiny_voc, "--split", "train", "--preset", "cam", "--pretrained", pretrained, *SMALL]
    assert main(["train-cam", *map(str, common), "--out", str(single)]) == 0
    r = torchrun("train-cam", *common, "--out", double, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(single / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(double / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    moved = 0
    init = build_resnet("resnet18", base_width=8).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += k.startswith("spotlight.backbone.layer4") and not torch.equal(a[k], init.get(k[19:], a[k]))
    assert moved > 0  # the runs trained: the comparison is not between two untouched copies

    # make-cam of the one-process run: 2 processes write exactly the files of 1 process.
    cams1, cams2 = tmp_path / "cams1", tmp_path / "cams2"
    assert main(["make-cam", "--run-dir", str(single), "--data", str(tiny_voc), "--split", "train", "--out",
                 str(cams1), "--scales", "1.0,0.5", "--device", "cpu"]) == 0
    capsys.readouterr()
    r = torchrun("make-cam", "--run-dir", single, "--data", tiny_voc, "--split", "train", "--out", cams2,
                 "--scales", "1.0,0.5", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(p.name for p in cams1.glob("*.npz"))
    assert len(names) == 8 and sorted(p.name for p in cams2.glob("*.npz")) == names
    for name in names:
        x, y = np.load(cams1 / name), np.load(cams2 / name)
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_allclose(y[key].astype(np.float32), x[key].astype(np.float32), atol=1e-4, err_msg=key)

    # A folder of other settings is refused by the first process, and every process exits with its
    # one error line; nothing there changes.
    before = {p.name: p.stat().st_mtime_ns for p in cams2.iterdir()}
    r = torchrun("make-cam", "--run-dir", single, "--data", tiny_voc, "--split", "train", "--out", cams2,
                 "--scales", "1.0", "--device", "cpu", cwd=tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("amrseg: error:")]
    assert len(errors) == 2 and all("made with other settings" in e and "scales" in e for e in errors), errors
    assert {p.name: p.stat().st_mtime_ns for p in cams2.iterdir()} == before


def test_a_progress_bar_starts_no_thread_before_the_dataloader_forks():
    # A thread being created while a DataLoader forks its workers can hang the child for ever
    # (CPython's thread-state lock, held at fork, is never released in the child); tqdm's monitor
    # thread started with the first bar, just before make-cam's workers forked.
    code = ("import threading\nfrom amrseg.runtime import progress\n"
            "for enabled in (False, True):\n    list(progress(range(3), enabled=enabled))\n"
            "print(sorted(t.name for t in threading.enumerate()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['MainThread']"
