"""CAM files: round trip, atomic writes, one-line errors for bad files, fuse / normalise_max math."""
import os

import numpy as np
import pytest
import torch

from amrseg.cam.io import evidence, fuse, load_cam, normalise_max, save_cam
from amrseg.errors import AmrsegError


def _maps(n=2, h=5, w=6, seed=0):
    rng = np.random.default_rng(seed)
    return normalise_max(rng.random((n, h, w)).astype(np.float32))


def _assert_one_line_error(path, match):
    with pytest.raises(AmrsegError) as info:
        load_cam(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}:")
    assert match in msg, msg


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_round_trip(tmp_path, dtype):
    keys = np.array([1, 4], dtype=np.int64)
    high_res, cam = _maps(), _maps(h=2, w=2, seed=1)
    branches = {"spotlight": _maps(seed=2), "compensation": _maps(seed=3)}
    path = save_cam(tmp_path / "a.npz", keys, high_res, cam=cam, branches=branches, dtype=dtype)
    out = load_cam(path)
    assert set(out) == {"keys", "high_res", "cam", "high_res_spotlight", "high_res_compensation"}
    np.testing.assert_array_equal(out["keys"], keys)
    assert out["keys"].dtype == np.int64 and out["high_res"].dtype == dtype
    tol = 1e-3 if dtype == np.float16 else 0
    np.testing.assert_allclose(out["high_res"], high_res, atol=tol)
    np.testing.assert_allclose(out["cam"], cam, atol=tol)
    np.testing.assert_allclose(out["high_res_compensation"], branches["compensation"], atol=tol)


def test_active_round_trip_and_evidence(tmp_path):
    keys = np.array([0, 3, 5], dtype=np.int64)
    high_res, cam = _maps(n=3), _maps(n=3, h=2, w=2, seed=1)
    branches = {"spotlight": _maps(n=3, seed=2), "compensation": _maps(n=3, seed=3)}
    active = np.array([True, False, True])
    out = load_cam(save_cam(tmp_path / "a.npz", keys, high_res, cam=cam, branches=branches, active=active))
    assert out["active"].dtype == np.bool_ and out["active"].tolist() == [True, False, True]
    ev = evidence(out)
    for name in ("high_res", "cam", "high_res_spotlight", "high_res_compensation"):
        assert not ev[name][1].any()  # the inactive class reads as no evidence
        np.testing.assert_array_equal(ev[name][[0, 2]], out[name][[0, 2]])
        assert out[name][1].any()  # the loaded arrays themselves are untouched
    plain = {"keys": keys, "high_res": high_res}
    assert evidence(plain) is plain  # no 'active': nothing to do


def test_minimal_file_and_no_classes(tmp_path):
    save_cam(tmp_path / "e.npz", np.zeros(0, dtype=np.int64), np.zeros((0, 3, 4), dtype=np.float32))
    out = load_cam(tmp_path / "e.npz")
    assert set(out) == {"keys", "high_res"} and out["high_res"].shape == (0, 3, 4)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.npz"
    save_cam(path, np.array([0]), np.zeros((1, 2, 2)))
    save_cam(path, np.array([3]), np.ones((1, 2, 2)))
    assert os.listdir(tmp_path) == ["x.npz"]
    assert load_cam(path)["keys"].tolist() == [3]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.npz"
    save_cam(path, np.array([0]), np.zeros((1, 2, 2)))

    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04 half of an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_cam(path, np.array([5]), np.ones((1, 2, 2)))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["x.npz"]
    assert load_cam(path)["keys"].tolist() == [0]


def test_missing_truncated_and_garbage_files(tmp_path):
    _assert_one_line_error(tmp_path / "none.npz", "not found")
    path = save_cam(tmp_path / "t.npz", np.array([0, 1]), _maps(h=40, w=40))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(path, "not a readable")
    path.write_bytes(b"\x00garbage bytes, not an archive" * 10)
    _assert_one_line_error(path, "not a readable")
    np.save(tmp_path / "bare.npy", np.zeros(3))
    os.replace(tmp_path / "bare.npy", path)  # an .npy array under an .npz name
    _assert_one_line_error(path, "not a readable")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, keys=np.array([0]), high_res=np.array([{"evil": 1}], dtype=object))
    _assert_one_line_error(path, "not a readable")


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"high_res": np.zeros((1, 2, 2), np.float32)}, "missing array 'keys'"),
        ({"keys": np.array([0])}, "missing array 'high_res'"),
        ({"keys": np.array([0], np.int32), "high_res": np.zeros((1, 2, 2), np.float32)}, "int64"),
        ({"keys": np.array([2, 1]), "high_res": np.zeros((2, 2, 2), np.float32)}, "ascending"),
        ({"keys": np.array([1, 1]), "high_res": np.zeros((2, 2, 2), np.float32)}, "ascending"),
        ({"keys": np.array([-1]), "high_res": np.zeros((1, 2, 2), np.float32)}, "non-negative"),
        ({"keys": np.array([0]), "high_res": np.zeros((1, 2, 2), np.float64)}, "float16 or float32"),
        ({"keys": np.array([0, 1]), "high_res": np.zeros((1, 2, 2), np.float32)}, "n = 2 keys"),
        ({"keys": np.array([0]), "high_res": np.zeros((2, 2), np.float32)}, "[n, H, W]"),
        ({"keys": np.array([0]), "high_res": np.full((1, 2, 2), np.nan, np.float32)}, "non-finite"),
        ({"keys": np.array([0]), "high_res": np.full((1, 2, 2), 1.5, np.float32)}, "[0, 1]"),
        ({"keys": np.array([0]), "high_res": np.full((1, 2, 2), -0.1, np.float32)}, "[0, 1]"),
        ({"keys": np.array([0]), "high_res": np.zeros((1, 2, 2), np.float32),
          "high_res_spotlight": np.zeros((1, 2, 3), np.float32)}, "differs from 'high_res'"),
        ({"keys": np.array([0]), "high_res": np.zeros((1, 2, 2), np.float32),
          "cam": np.full((1, 1, 1), 2.0, np.float32)}, "'cam' values"),
        ({"keys": np.array([0]), "high_res": np.zeros((1, 2, 2), np.float32),
          "active": np.array([1], np.uint8)}, "'active' must be bool"),
        ({"keys": np.array([0]), "high_res": np.zeros((1, 2, 2), np.float32),
          "active": np.array([True, False])}, "'active' must be bool [1]"),
    ],
)
def test_broken_invariants(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez_compressed(path, **arrays)
    _assert_one_line_error(path, match)


def test_save_refuses_invalid_maps(tmp_path):
    with pytest.raises(AmrsegError, match="n = 2 keys"):
        save_cam(tmp_path / "s.npz", np.array([0, 1]), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="branch"):
        save_cam(tmp_path / "s.npz", np.array([0]), np.zeros((1, 2, 2)), branches={"other": np.zeros((1, 2, 2))})
    assert os.listdir(tmp_path) == []


def test_normalise_max_numpy_and_torch():
    maps = np.array([[[2.0, 1.0], [0.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]], dtype=np.float32)
    expected = np.array([[[2 / (2 + 1e-5), 1 / (2 + 1e-5)], [0.0, 0.5 / (2 + 1e-5)]], [[0, 0], [0, 0]]])
    out = normalise_max(maps)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    out_t = normalise_max(torch.from_numpy(maps))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), expected, rtol=1e-6)
    assert normalise_max(np.array([[[4, 2]]])).dtype == np.float32  # integers become float
    assert maps[0, 0, 0] == 2.0  # input untouched


def test_fuse_by_hand():
    s = np.array([[[1.0, 0.0], [0.5, 0.0]]], dtype=np.float32)
    c = np.array([[[0.0, 1.0], [0.5, 0.0]]], dtype=np.float32)
    # xi = 0.25: 0.25 * S + 0.75 * C = [[0.25, 0.75], [0.5, 0]], max 0.75
    expected = np.array([[[0.25, 0.75], [0.5, 0.0]]]) / (0.75 + 1e-5)
    np.testing.assert_allclose(fuse(s, c, 0.25), expected, rtol=1e-6)
    np.testing.assert_allclose(fuse(torch.from_numpy(s), torch.from_numpy(c), 0.25).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(fuse(s, c, 1.0), s / (1 + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError):
        fuse(s, c[:, :1], 0.5)
    with pytest.raises(ValueError):
        fuse(s, c, 1.5)
