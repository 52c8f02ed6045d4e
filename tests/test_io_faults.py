"""Operating-system faults: one line naming the path, exit 2, found before the work starts where possible;
a broken pipe exits quietly; temporary files left by kill -9 are cleaned up by the next run."""
import errno
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import amrseg.fileio as fileio
from amrseg.cli import main
from amrseg.errors import AmrsegError
from amrseg.fileio import atomic_write, check_writable_dir, check_writable_file, clean_stale_temps, write_text

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- output checks


def test_output_folder_that_is_a_file_or_lies_under_one(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(AmrsegError, match=r"^--out .*file: exists and is not a folder$"):
        check_writable_dir(f, "--out")
    with pytest.raises(AmrsegError, match=r"^--out .*file/sub: .*file is a file, not a folder$"):
        check_writable_dir(f / "sub", "--out")
    with pytest.raises(AmrsegError, match=r"^--out .*: is a folder, expected a file name$"):
        check_writable_file(tmp_path, "--out")
    with pytest.raises(AmrsegError, match=r"^--out .*file/m.json: its folder"):
        check_writable_file(f / "m.json", "--out")
    # checked without a trace: a command refused later for another reason leaves no folder behind
    check_writable_dir(tmp_path / "a" / "b", "--out")
    assert not (tmp_path / "a").exists()
    assert check_writable_dir(tmp_path / "a" / "b", "--out", create=True).is_dir()  # parents too
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == []  # the probe file is gone


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders; the monkeypatched test covers it")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(AmrsegError, match="cannot write into the folder"):
            check_writable_dir(ro, "--out")
        with pytest.raises(AmrsegError, match="cannot create the folder"):
            check_writable_dir(ro / "new", "--out")
    finally:
        ro.chmod(0o755)


def test_unwritable_folder_simulated(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)
    with pytest.raises(AmrsegError, match=r"^--save .*: cannot write into the folder \(Permission denied\)$"):
        check_writable_dir(tmp_path, "--save")
    # a missing folder is probed in its parent, and nothing is created
    with pytest.raises(AmrsegError, match=r"^--out .*new/sub: cannot create the folder \(Permission denied\)$"):
        check_writable_dir(tmp_path / "new" / "sub", "--out")
    assert not (tmp_path / "new").exists()
    with pytest.raises(AmrsegError, match=r"^.*x.json: cannot write \(Permission denied\)$"):
        write_text(tmp_path / "x.json", "{}")


def test_full_disk_simulated_is_one_error_naming_the_file_and_leaves_no_temp(tmp_path):
    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(AmrsegError) as e:
        atomic_write(tmp_path / "cams" / "a.npz", full)
    assert str(e.value) == f"{tmp_path / 'cams' / 'a.npz'}: cannot write (No space left on device)"
    assert list((tmp_path / "cams").iterdir()) == []


def test_torch_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import collections
    import shutil

    from amrseg import fileio

    def failing_save(obj, f):  # what torch's zip writer raises when a write fails
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))
    with pytest.raises(AmrsegError, match=r"checkpoint.pt: cannot write \(No space left on device\)$"):
        fileio.atomic_torch_save({"w": torch.zeros(10)}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB file system (tmpfs), where the machine lets us mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a small tmpfs here (needs root); the simulated tests cover it")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_real_full_disk(tiny_disk):
    with pytest.raises(AmrsegError, match=r"big.txt: cannot write \(No space left on device\)$"):
        write_text(tiny_disk / "big.txt", "x" * 200_000)
    from amrseg.fileio import atomic_torch_save

    with pytest.raises(AmrsegError, match=r"w.pt: cannot write \(No space left on device\)$"):
        atomic_torch_save({"w": torch.zeros(100_000)}, tiny_disk / "w.pt")
    assert [p.name for p in tiny_disk.iterdir()] == []  # no temporary file left


def test_train_cam_on_a_real_tiny_disk_stops_before_training(tiny_disk, tiny_voc, capsys):
    code = main(["train-cam", "--data", str(tiny_voc), "--split", "train", "--preset", "cam", "--out",
                 str(tiny_disk / "run"), "--backbone", "resnet18", "--base-width", "16", "--pretrained", "none",
                 "--crop", "32", "--batch-size", "4", "--device", "cpu", "--set", "train.num_workers=0"])
    assert code == 2
    err = _one_line(capsys)
    assert "--out" in err and "MiB free" in err


# --------------------------------------------------------------------------- every command checks its outputs first


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the work started before the output was checked")


@pytest.mark.parametrize("cmd, patch", [
    (["pretrain-backbone", "--out", "{file}/w.pt"], "amrseg.stages.pretrain_backbone.pretrain_backbone"),
    (["eval-cam", "--cams", "{tmp}", "--data", "{tmp}", "--split", "val", "--out", "{file}/m.json"],
     "amrseg.stages.eval_cam.evaluate_cams"),
    (["eval-cam", "--cams", "{tmp}", "--data", "{tmp}", "--split", "val", "--out", "{tmp}"],
     "amrseg.stages.eval_cam.evaluate_cams"),
    (["make-cam", "--run", "{tmp}", "--data", "{tmp}", "--out", "{file}"], "amrseg.stages.make_cam.load_run"),
    (["visualize", "--cams", "{tmp}", "--data", "{tmp}", "--split", "val", "--out", "{file}"], "amrseg.stages.visualize.draw_gallery"),
    (["pseudo-labels", "--cams", "{tmp}", "--data", "{tmp}", "--split", "val", "--method", "crf", "--out", "{file}"],
     "amrseg.stages.pseudo_labels.open_dataset"),
    (["predict", "--run", "{tmp}", "--input", "{tmp}", "--out", "{file}"], "amrseg.stages.predict.load_run"),
    (["eval-seg", "--pred", "{tmp}", "--data", "{tmp}", "--split", "val", "--out", "{file}/m.json"],
     "amrseg.stages.eval_seg.open_dataset"),
    (["train-cam", "--data", "{tmp}", "--split", "train", "--preset", "cam", "--out", "{file}",
      "--device", "cpu"], "amrseg.engine.train.open_dataset"),
])
def test_a_bad_output_is_refused_before_the_work(tmp_path, monkeypatch, capsys, cmd, patch):
    f = tmp_path / "file"
    f.write_text("x")
    module, name = patch.rsplit(".", 1)
    monkeypatch.setattr(__import__(module, fromlist=[name]), name, _fail_if_called)
    argv = [a.format(tmp=tmp_path, file=f) for a in cmd]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert err.startswith(f"amrseg: error: --out {argv[argv.index('--out') + 1]}: "), err


def test_eval_cam_device_is_a_choice_checked_before_the_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(__import__("amrseg.stages.eval_cam", fromlist=["x"]), "evaluate_cams", _fail_if_called)
    with pytest.raises(SystemExit) as e:
        main(["eval-cam", "--cams", str(tmp_path), "--data", str(tmp_path), "--split", "val", "--device", "gpu"])
    assert e.value.code == 2
    capsys.readouterr()
    if torch.cuda.is_available():
        return
    assert main(["eval-cam", "--cams", str(tmp_path), "--data", str(tmp_path), "--split", "val",
                 "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in _one_line(capsys)


# --------------------------------------------------------------------------- last resort, broken pipe


def test_an_oserror_no_stage_named_is_still_one_line(monkeypatch, capsys, tiny_voc):
    import amrseg.data.voc as voc

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/JPEGImages/x.jpg")

    monkeypatch.setattr(voc, "dataset_info", denied)
    assert main(["dataset-info", "--data", str(tiny_voc), "--split", "train"]) == 2
    assert _one_line(capsys) == "amrseg: error: /data/JPEGImages/x.jpg: Permission denied"


def test_broken_pipe_in_process_is_quiet(monkeypatch, capsys, tiny_voc):
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["dataset-info", "--data", str(tiny_voc), "--split", "train"]) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_broken_pipe_from_a_real_pipe_exits_quietly(tiny_voc):
    # `amrseg ... | head`: the reader is gone before amrseg writes.
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.run([sys.executable, "-m", "amrseg", "dataset-info", "--data", str(tiny_voc), "--split",
                           "train"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(w)
    assert proc.returncode == 141 and proc.stderr == ""


# --------------------------------------------------------------------------- stale temporary files


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _touch(path, age_s: float):
    path.write_bytes(b"half")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_which_temporary_files_are_stale(tmp_path):
    host, start = fileio.HOST, time.time()
    dead, alive = _dead_pid(), os.getpid()
    stale = _touch(tmp_path / f".a.npz.{dead}-{host}-abcd_123.tmp", 60)
    live_writer = _touch(tmp_path / f".b.npz.{os.getppid()}-{host}-abcd_123.tmp", 60)
    newer = _touch(tmp_path / f".c.npz.{dead}-{host}-abcd_123.tmp", -60)  # written after this process began
    old_style = _touch(tmp_path / ".d.npz.k2j4_x9z.tmp", 60)  # mkstemp name of amrseg < 0.2
    other_host_recent = _touch(tmp_path / f".e.npz.{dead}-otherhost-abcd_123.tmp", 60)
    other_host_old = _touch(tmp_path / f".f.npz.{dead}-otherhost-abcd_123.tmp", 7200)
    users = _touch(tmp_path / ".notes.tmp", 60)  # not a name fileio makes
    assert fileio.is_stale_temp(stale, start)
    assert not fileio.is_stale_temp(live_writer, start)
    assert not fileio.is_stale_temp(newer, start)
    assert fileio.is_stale_temp(old_style, start)
    assert not fileio.is_stale_temp(other_host_recent, start)
    assert fileio.is_stale_temp(other_host_old, start)
    assert not fileio.is_stale_temp(users, start)
    assert alive  # (the current process is alive: its own older temp could only come from a reused pid)


_KILLED_WRITER = r"""
import os, signal, sys
from amrseg.fileio import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half of it")
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write)
"""


def test_kill_9_during_a_write_then_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "cams"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out / "a.npz")], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".a.npz.") and left[0].endswith(".tmp")
    # the next process writing into that folder removes it (this test process began before the
    # killed one, so its files are not "older than this process" here: a fresh process does it)
    code = ("import sys; from amrseg.fileio import write_text; write_text(sys.argv[1], 'ok')")
    subprocess.run([sys.executable, "-c", code, str(out / "b.txt")], check=True, timeout=120)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_clean_stale_temps_leaves_other_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "PROCESS_START", time.time())
    stale = _touch(tmp_path / f".x.png.{_dead_pid()}-{fileio.HOST}-abcdefgh.tmp", 60)
    keep = [_touch(tmp_path / "x.png", 60), _touch(tmp_path / ".hidden", 60), _touch(tmp_path / "y.tmp", 60)]
    assert clean_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
