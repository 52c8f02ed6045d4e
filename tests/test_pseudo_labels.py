"""pseudo-labels: IR labels (crf) and IRN pseudo masks (irn) through the CLI, resumability, bad input."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from amrseg.cam.io import save_cam
from amrseg.cli import main
from amrseg.config import Config, to_dict
from amrseg.data.voc import open_dataset, read_mask, write_palette_png
from amrseg.errors import AmrsegError
from amrseg.models.affinity import search_offsets
from amrseg.refine.crf import ir_label
from amrseg.refine.pseudo_labels import strided_cams
from amrseg.refine.random_walk import (
    affinity_coo,
    random_walk,
    dense_affinity,
    random_walk_sparse,
    suggested_exp_times,
    walk,
)


def write_cams(root, split, out, method="cam", strided=False):
    """CAMs made from the masks: each class's mask, blurred, max 1 (and a faint halo around it).

    strided: also the stride-4 `cam` array, [n, ceil(H/4), ceil(W/4)]: the mask's mean over each
    4x4 cell (cells past the image count as empty), blurred, max 1.
    """
    data = open_dataset(root, split, require_labels=False)
    out.mkdir(parents=True, exist_ok=True)
    for i, iid in enumerate(data.ids):
        mask = data.load_mask(i)
        keys = np.flatnonzero(data.labels[i]).astype(np.int64)
        maps, cells = [], []
        for k in keys:
            m = torch.from_numpy((mask == k + 1).astype(np.float32))[None, None]
            c = torch.nn.functional.avg_pool2d(m, 4, ceil_mode=True, count_include_pad=False)
            c = torch.nn.functional.avg_pool2d(c, 3, stride=1, padding=1, count_include_pad=False)[0, 0].numpy()
            m = torch.nn.functional.avg_pool2d(m, 5, stride=1, padding=2, count_include_pad=False)[0, 0].numpy()
            maps.append(m / max(m.max(), 1e-5))
            cells.append(c / max(c.max(), 1e-5))
        high_res = np.stack(maps) if maps else np.zeros((0,) + mask.shape, np.float32)
        grid = (-(-mask.shape[0] // 4), -(-mask.shape[1] // 4))
        cam = (np.stack(cells) if cells else np.zeros((0,) + grid, np.float32)) if strided else None
        save_cam(out / f"{iid}.npz", keys, high_res, cam=cam)
    if method is not None:
        (out / "cams.json").write_text(json.dumps({"method": method, "run": "x", "scales": [1.0], "xi": 0.5}))
    return out


def _pseudo(cams, root, out, method, *extra, split="train"):
    return main(["pseudo-labels", "--cams", str(cams), "--data", str(root), "--split", split, "--out", str(out),
                 "--method", method, *extra])


def _summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_crf_writes_ir_labels_and_a_rerun_leaves_them_alone(tiny_voc, tmp_path, capsys):
    pytest.importorskip("pydensecrf.densecrf")
    cams = write_cams(tiny_voc, "train", tmp_path / "cams")
    out = tmp_path / "ir"
    assert _pseudo(cams, tiny_voc, out, "crf", "--workers", "2") == 0
    s = _summary(capsys)
    assert (s["written"], s["skipped"], s["num_images"], s["scored_images"]) == (8, 0, 8, 8)
    assert (s["cam_method"], s["fg_threshold"], s["bg_threshold"], s["crf"]) == ("cam", 0.30, 0.05, True)
    assert s["confident_precision"] > 0.95 and 0.3 < s["confident_fraction"] < 1.0
    data = open_dataset(tiny_voc, "train")
    for i, iid in enumerate(data.ids):
        with Image.open(out / f"{iid}.png") as img:
            assert img.mode == "P" and img.size == (32, 32)
        label = read_mask(out / f"{iid}.png")
        allowed = {0, 255} | {int(k) + 1 for k in np.flatnonzero(data.labels[i])}
        assert set(np.unique(label).tolist()) <= allowed
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _pseudo(cams, tiny_voc, out, "crf", "--workers", "1") == 0
    again = _summary(capsys)
    assert (again["written"], again["skipped"]) == (0, 8)
    assert again["confident_precision"] == s["confident_precision"]  # scored from the files on disk
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_crf_thresholds_follow_the_cam_method(tiny_voc, tmp_path, capsys):
    cams = write_cams(tiny_voc, "val", tmp_path / "cams", method="advcam")
    out = tmp_path / "ir"
    assert _pseudo(cams, tiny_voc, out, "crf", "--no-crf", "--workers", "1", split="val") == 0
    s = _summary(capsys)
    assert (s["cam_method"], s["fg_threshold"], s["bg_threshold"], s["crf"]) == ("advcam", 0.60, 0.33, False)
    data = open_dataset(tiny_voc, "val")
    cam = np.load(cams / f"{data.ids[0]}.npz")
    expected = ir_label(data.load_image(0), cam["high_res"], cam["keys"], 0.60, 0.33, crf=False)
    np.testing.assert_array_equal(read_mask(out / f"{data.ids[0]}.png"), expected)
    # No cams.json: a warning, and the plain-CAM thresholds; flags override both.
    (cams / "cams.json").unlink()
    assert _pseudo(cams, tiny_voc, tmp_path / "ir2", "crf", "--no-crf", "--workers", "1", split="val") == 0
    captured = capsys.readouterr()
    assert "cams.json" in captured.err and json.loads(captured.out)["fg_threshold"] == 0.30
    assert _pseudo(cams, tiny_voc, tmp_path / "ir3", "crf", "--no-crf", "--workers", "1", "--cam-method",
                   "gradcam", "--fg-threshold", "0.5", split="val") == 0
    s = _summary(capsys)
    assert (s["cam_method"], s["fg_threshold"], s["bg_threshold"]) == ("gradcam", 0.5, 0.05)


def test_a_rerun_with_other_settings_is_refused_and_overwrite_remakes(tiny_voc, tmp_path, capsys):
    cams = write_cams(tiny_voc, "val", tmp_path / "cams")
    out = tmp_path / "ir"
    run = lambda *extra: _pseudo(cams, tiny_voc, out, "crf", "--no-crf", "--workers", "1", *extra, split="val")
    assert run() == 0
    first = _summary(capsys)
    made = yaml.safe_load((out / "config.yaml").read_text())
    assert (made["fg_threshold"], made["bg_threshold"], made["crf"]) == (0.30, 0.05, False)
    labels = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert len(labels) == first["written"] > 0
    # Another threshold into the same folder: refused, naming the difference, nothing touched.
    assert run("--fg-threshold", "0.5") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fg_threshold 0.3 -> 0.5" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == labels
    # Workers do not change the labels: not a difference.
    assert _pseudo(cams, tiny_voc, out, "crf", "--no-crf", "--workers", "0", split="val") == 0
    assert _summary(capsys)["skipped"] == len(labels)
    # --overwrite: every label made again with the new threshold, and recorded.
    assert run("--fg-threshold", "0.5", "--overwrite") == 0
    s = _summary(capsys)
    assert (s["written"], s["skipped"], s["fg_threshold"]) == (len(labels), 0, 0.5)
    assert yaml.safe_load((out / "config.yaml").read_text())["fg_threshold"] == 0.5
    data = open_dataset(tiny_voc, "val")
    cam = np.load(cams / f"{data.ids[0]}.npz")
    expected = ir_label(data.load_image(0), cam["high_res"], cam["keys"], 0.5, 0.05, crf=False)
    np.testing.assert_array_equal(read_mask(out / f"{data.ids[0]}.png"), expected)
    # Labels of unknown origin (no config.yaml) are refused too.
    (out / "config.yaml").unlink()
    assert run("--fg-threshold", "0.5") == 2
    assert "unknown settings" in capsys.readouterr().err


def test_sparse_random_walk_equals_the_dense_reference():
    gen = torch.Generator().manual_seed(3)
    h, w, radius = 9, 11, 4
    offsets = search_offsets(radius)
    aff = torch.rand(len(offsets), h, w, generator=gen)
    coo = affinity_coo(aff, offsets)
    assert coo.is_sparse and coo._nnz() < h * w * (2 * len(offsets) + 1)  # out-of-grid pairs dropped
    torch.testing.assert_close(coo.to_dense(), dense_affinity(aff, offsets))
    cams = torch.rand(3, h, w, generator=gen)
    for exp_times in (0, 4):
        torch.testing.assert_close(random_walk_sparse(cams, coo, 10.0, exp_times),
                                   random_walk(cams, dense_affinity(aff, offsets), 10.0, exp_times, squaring=False))
    boundary = torch.rand(h, w, generator=gen) * 0.6
    kw = dict(radius=5, beta=10.0, exp_times=6, cam_power=1.5)
    torch.testing.assert_close(walk(cams, boundary, sparse=True, **kw),
                               walk(cams, boundary, sparse=False, **kw), rtol=1e-4, atol=1e-5)


def test_strided_cams_of_old_files_are_resized_as_irn_then_max_normalised():
    # 6 x 7 -> the 2 x 2 grid. Bilinear with half-pixel centres samples source row (i + 0.5) * 6 / 2
    # - 0.5 = 1, 4 and column (j + 0.5) * 7 / 2 - 0.5 = 1.25, 4.75 of x[y, x] = 7 y + x.
    x = torch.arange(6 * 7, dtype=torch.float32).view(1, 6, 7)
    out = strided_cams(x)
    raw = torch.tensor([[7 * 1 + 1.25, 7 * 1 + 4.75], [7 * 4 + 1.25, 7 * 4 + 4.75]])
    torch.testing.assert_close(out[0], raw / (raw.max() + 1e-5))
    assert out.amax().item() == pytest.approx(1.0, abs=1e-5)  # peaks at 1, unlike a 4x4 average
    assert strided_cams(torch.zeros(0, 6, 7)).shape == (0, 2, 2)


def _irn_run(tiny_voc, tmp_path, cams, crop=32, epochs=1):
    """A trained (one step per epoch) IRN run, on IR labels that are the train masks themselves."""
    data = open_dataset(tiny_voc, "train")
    labels = tmp_path / "ir"
    labels.mkdir()
    for i, iid in enumerate(data.ids):
        write_palette_png(labels / f"{iid}.png", data.load_mask(i))
    run = tmp_path / "irn"
    assert main(["train-irn", "--cams", str(cams), "--ir-labels", str(labels), "--data", str(tiny_voc), "--split",
                 "train", "--out", str(run), "--epochs", str(epochs), "--backbone", "resnet18", "--base-width", "8",
                 "--pretrained", "none", "--crop", str(crop), "--batch-size", "8", "--device", "cpu",
                 "--set", "model.radius=3", "--set", "train.num_workers=0"]) == 0
    return run


def test_irn_pseudo_masks_end_to_end(tiny_voc, tmp_path, capsys):
    cams = write_cams(tiny_voc, "val", tmp_path / "cams")  # high_res only: an older make-cam's files
    run = _irn_run(tiny_voc, tmp_path, cams)
    capsys.readouterr()
    out = tmp_path / "masks"
    args = ["--irn", str(run), "--workers", "0", "--exp-times", "3", "--device", "cpu"]
    assert _pseudo(cams, tiny_voc, out, "irn", *args, split="val") == 0
    captured = capsys.readouterr()
    s = json.loads(captured.out.strip().splitlines()[-1])
    assert (s["written"], s["skipped"], s["scored_images"], s["cams_resized"]) == (4, 0, 4, 4)
    assert "no stride-4 'cam' array" in captured.err
    # CAMs of method cam: IRN's thresholds 0.30/0.05, so IRN's power 1.
    assert (s["cam_method"], s["radius"], s["beta"], s["exp_times"], s["cam_power"], s["bg_threshold"]) == \
        ("cam", 5, 10.0, 3, 1.0, 0.25)
    assert 0.0 <= s["miou"] <= 1.0
    data = open_dataset(tiny_voc, "val")
    for i, iid in enumerate(data.ids):
        mask = read_mask(out / f"{iid}.png")
        assert mask.shape == (32, 32)
        assert set(np.unique(mask).tolist()) <= {0} | {int(k) + 1 for k in np.flatnonzero(data.labels[i])}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _pseudo(cams, tiny_voc, out, "irn", *args, split="val") == 0
    again = _summary(capsys)
    assert (again["written"], again["skipped"], again["miou"]) == (0, 4, s["miou"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_suggested_exp_times_scales_the_walk_with_the_image_side():
    # 8 + 2 log2(side / 512), hand-computed: 512 -> 8, 1024 -> 10, 128 -> 4, 160 -> 4.64 -> 5, 32 -> 0 -> 1
    assert [suggested_exp_times(s) for s in (512, 1024, 128, 160, 32)] == [8, 10, 4, 5, 1]
    with pytest.raises(ValueError):
        suggested_exp_times(0)


def test_the_default_walk_on_small_images_warns_with_the_length_that_fits(tiny_voc, tmp_path, capsys):
    cams = write_cams(tiny_voc, "val", tmp_path / "cams", strided=True)
    run = _irn_run(tiny_voc, tmp_path, cams)
    capsys.readouterr()
    args = ["--irn", str(run), "--workers", "0", "--device", "cpu"]
    assert _pseudo(cams, tiny_voc, tmp_path / "m8", "irn", *args, split="val") == 0
    err = capsys.readouterr().err
    assert "--exp-times: the default 8 (2^8 walk steps) is IRN's for ~500 px images; these are about 32 px, " \
           "where a walk of 2^1 steps reaches as far (--exp-times 1)" in err
    # a length given by the user is the user's: no warning
    assert _pseudo(cams, tiny_voc, tmp_path / "m1", "irn", *args, "--exp-times", "8", split="val") == 0
    assert "--exp-times" not in capsys.readouterr().err


def _odd_sizes(root, split, cuts=((0, 0), (5, 3), (3, 7), (1, 6))):
    """Cuts the split's images and masks to other sizes (H - a) x (W - b), none a multiple of 4 or 16."""
    data = open_dataset(root, split)
    for i, iid in enumerate(data.ids):
        a, b = cuts[i % len(cuts)]
        image, mask = data.load_image(i), data.load_mask(i)
        h, w = mask.shape
        Image.fromarray(image[: h - a, : w - b]).save(root / "JPEGImages" / f"{iid}.jpg", quality=95)
        write_palette_png(root / "SegmentationClass" / f"{iid}.png", mask[: h - a, : w - b])


def test_irn_pseudo_masks_match_a_slow_reading_of_irn(tiny_voc, tmp_path, capsys):
    # The whole `pseudo-labels --method irn` against tests/irn_reference.py, IRN's and AMR's
    # make_sem_seg_labels read from their formulas: the stride-4 `cam` array, the boundary of the
    # image + flip padded to the crop, IRN's two-pixel paths, the walk, x4, normalised on the image.
    from irn_reference import irn_boundary, sem_seg_label

    from amrseg.data.transforms import normalize
    from amrseg.runs import load_run

    _odd_sizes(tiny_voc, "val")
    cams = write_cams(tiny_voc, "val", tmp_path / "cams", method="advcam", strided=True)
    run = _irn_run(tiny_voc, tmp_path, cams, crop=48, epochs=2)
    capsys.readouterr()
    out = tmp_path / "masks"
    # 2^2 steps: on these 8 x 8 grids 2^8 would spread every class over its whole image.
    assert _pseudo(cams, tiny_voc, out, "irn", "--irn", str(run), "--workers", "0", "--device", "cpu",
                   "--exp-times", "2", split="val") == 0
    captured = capsys.readouterr()
    s = json.loads(captured.out.strip().splitlines()[-1])
    assert (s["cam_method"], s["cam_power"], s["cams_resized"]) == ("advcam", 1.5, 0)  # AMR's pair
    assert "warning" not in captured.err
    model = load_run(run, "irn").model
    data = open_dataset(tiny_voc, "val")
    equal = total = mixed = 0
    sizes = set()
    for i, iid in enumerate(data.ids):
        image = data.load_image(i)
        sizes.add(image.shape[:2])
        cam = np.load(cams / f"{iid}.npz")
        edge = irn_boundary(model, normalize(image), crop=48)
        want = sem_seg_label(cam["cam"].astype(np.float64), edge, cam["keys"], image.shape[:2], cam_power=1.5,
                             exp_times=2)
        got = read_mask(out / f"{iid}.png")
        equal += int((got == want).sum())
        total += want.size
        mixed += len(np.unique(want)) > 1
    assert len(sizes) == 4 and mixed >= 3  # odd sizes, and masks that are not one class everywhere
    assert equal / total >= 0.9999, equal / total


def test_cam_power_follows_the_thresholds_of_the_cam_method(tiny_voc, tmp_path, capsys):
    from amrseg.cam.methods import DEFAULT_THRESHOLDS, default_cam_power

    assert {m: (DEFAULT_THRESHOLDS[m], default_cam_power(m)) for m in ("cam", "gradcam", "advcam")} == {
        "cam": ((0.30, 0.05), 1.0), "gradcam": ((0.30, 0.05), 1.0), "advcam": ((0.60, 0.33), 1.5)}
    cams = write_cams(tiny_voc, "val", tmp_path / "cams", method="cam", strided=True)
    run = _irn_run(tiny_voc, tmp_path, cams)
    capsys.readouterr()
    args = ["--irn", str(run), "--workers", "0", "--exp-times", "1", "--device", "cpu"]
    # --cam-method now serves irn too; --cam-power wins over both.
    assert _pseudo(cams, tiny_voc, tmp_path / "a", "irn", *args, "--cam-method", "advcam", split="val") == 0
    assert _summary(capsys)["cam_power"] == 1.5
    assert _pseudo(cams, tiny_voc, tmp_path / "b", "irn", *args, "--cam-power", "2", split="val") == 0
    assert _summary(capsys)["cam_power"] == 2.0
    assert _pseudo(cams, tiny_voc, tmp_path / "c", "irn", *args, "--cam-power", "0", split="val") == 2
    _one_line_error(capsys, "--cam-power")


def test_a_cam_array_off_the_grid_is_a_one_line_error(tiny_voc, tmp_path, capsys):
    cams = write_cams(tiny_voc, "val", tmp_path / "cams", strided=True)
    data = open_dataset(tiny_voc, "val")
    bad = cams / f"{data.ids[1]}.npz"
    arrays = dict(np.load(bad))
    save_cam(bad, arrays["keys"], arrays["high_res"], cam=arrays["cam"][:, :-1])
    run = _irn_run(tiny_voc, tmp_path, cams)
    capsys.readouterr()
    assert _pseudo(cams, tiny_voc, tmp_path / "m", "irn", "--irn", str(run), "--workers", "0", "--device", "cpu",
                   split="val") == 2
    _one_line_error(capsys, f"{data.ids[1]}.npz", "stride-4 'cam'", "expected 8x8")


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("amrseg: error:"), err
    for n in needles:
        assert n in err, err


def test_bad_input_is_one_line(tiny_voc, tmp_path, capsys):
    cams = write_cams(tiny_voc, "val", tmp_path / "cams")
    out = tmp_path / "out"
    crf = ["--no-crf", "--workers", "1"]
    # a train-cam run given as --irn
    cam_run = tmp_path / "camrun"
    cam_run.mkdir()
    (cam_run / "config.yaml").write_text(yaml.safe_dump(to_dict(Config())))
    assert _pseudo(cams, tiny_voc, out, "irn", "--irn", str(cam_run), "--workers", "0", split="val") == 2
    _one_line_error(capsys, "--irn", "train-cam run")
    # a flag of the other method
    assert _pseudo(cams, tiny_voc, out, "irn", "--irn", str(cam_run), "--fg-threshold", "0.4", split="val") == 2
    _one_line_error(capsys, "--fg-threshold")
    assert _pseudo(cams, tiny_voc, out, "crf", "--irn", str(cam_run), split="val") == 2
    _one_line_error(capsys, "--irn")
    # a missing CAM file, named, before any work
    data = open_dataset(tiny_voc, "val")
    victim = cams / f"{data.ids[1]}.npz"
    kept = victim.read_bytes()
    victim.unlink()
    assert _pseudo(cams, tiny_voc, tmp_path / "out2", "crf", *crf, split="val") == 2
    _one_line_error(capsys, "--cams", f"{data.ids[1]}.npz")
    assert not (tmp_path / "out2").exists()
    victim.write_bytes(kept)
    # an unreadable image: its header opens, its pixels do not (in the main process and in a pool worker)
    image = tiny_voc / "JPEGImages" / f"{data.ids[2]}.jpg"
    image.write_bytes(image.read_bytes()[:200])
    for workers in ("1", "2"):
        assert _pseudo(cams, tiny_voc, out, "crf", "--no-crf", "--workers", workers, split="val") == 2
        _one_line_error(capsys, f"{data.ids[2]}.jpg", "cannot read image")


def test_inactive_classes_are_read_as_no_evidence(tmp_path):
    # make-cam gives a class the classifier activates nowhere a one-pixel peak (so the map peaks at
    # 1) and active=False; the random walk would grow the peak into a blob, so pseudo-labels reads 0.
    from amrseg.refine.pseudo_labels import checked_cam

    peak = np.zeros((2, 6, 5), np.float32)
    peak[0, 1:4, 1:3] = 1.0
    peak[1, 5, 4] = 1.0
    path = save_cam(tmp_path / "x.npz", np.array([0, 2]), peak, active=np.array([True, False]))
    cam = checked_cam(path, (6, 5), num_classes=3)
    np.testing.assert_array_equal(cam["high_res"][0], peak[0])
    assert not cam["high_res"][1].any()


# --------------------------------------------------------------------------- the refiner registry's contract


@pytest.mark.parametrize("name", sorted(__import__("amrseg.stages.pseudo_labels", fromlist=["x"]).REFINERS))
def test_refiner_contract(name):
    """Every refiner of REFINERS: its options are fields the command (and --set) can reach, the
    CAM method fills every option it leaves open, with valid values, for every registered method,
    and the options of another refiner are refused in one line."""
    import dataclasses

    from amrseg.cam.methods import CAM_METHODS
    from amrseg.stages.pseudo_labels import REFINERS, PseudoLabelConfig, refiner_options

    refiner = REFINERS[name]
    assert refiner.name == name and callable(refiner.run)
    stage_fields = {f.name for f in dataclasses.fields(PseudoLabelConfig)}
    own = {f.name for f in dataclasses.fields(refiner.options)}
    assert own <= stage_fields, own - stage_fields
    open_fields = {f.name for f in dataclasses.fields(refiner.options) if f.default is dataclasses.MISSING}
    base = PseudoLabelConfig(cams="c", data="d", split="s", out="o", method=name,
                             irn="/some/irn" if "irn" in own else None)
    for method in CAM_METHODS:
        filled = refiner.defaults(method)
        assert open_fields - {"irn"} <= set(filled) <= own
        opts = refiner_options(base, method)  # validates
        assert all(getattr(opts, k) == v for k, v in filled.items())
    for other, entry in REFINERS.items():
        foreign = {f.name for f in dataclasses.fields(entry.options)} - own - {"crf"}
        for field in sorted(foreign):
            typ = {f.name: f.type for f in dataclasses.fields(PseudoLabelConfig)}[field]
            value = "x" if "str" in str(typ) else 3
            with pytest.raises(AmrsegError, match=rf"^--{field.replace('_', '-')}: not used by --method {name}$"):
                refiner_options(dataclasses.replace(base, **{field: value}), "cam")
