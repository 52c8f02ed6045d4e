"""make-cam: batched maps equal the plain reference loop; files, skipping, flips, unlabelled data."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from amrseg.cam.infer import InferConfig, _advcam_maps, cams_for_batch, gradcam_maps
from amrseg.cam.io import load_cam
from amrseg.cam.reference import reference_cams
from amrseg.cli import main
from amrseg.config import load_preset, merge
from amrseg.models.amr import AMRNet

K = 4


def _model(preset="amr"):
    cfg = merge(load_preset(preset), {"model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"}})
    torch.manual_seed(0)
    model = AMRNet(cfg.model, cfg.amm, K)
    with torch.no_grad():  # non-trivial BN statistics, then inference
        model.train()(torch.randn(4, 3, 48, 48) * 1.3 + 0.2)
    return model.eval()


@pytest.mark.parametrize("method", ["cam", "gradcam"])
@pytest.mark.parametrize("preset", ["amr", "amr-official"])
def test_batched_equals_the_per_image_per_scale_loop(method, preset):
    model = _model(preset)
    images = torch.randn(3, 3, 28, 24)
    keys = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([0, 1, 3])]
    icfg = InferConfig(method=method, scales=[1.0, 0.5, 1.5], xi=0.3)
    batched = cams_for_batch(model, images, [k.clone() for k in keys], icfg)
    for b, (k, maps) in enumerate(batched):
        ref = reference_cams(model, images[b], keys[b].tolist(), icfg.scales, icfg.xi, method)
        assert k.tolist() == keys[b].tolist()
        for name in ref:
            torch.testing.assert_close(maps[name], ref[name], atol=1e-4, rtol=0)
        assert maps["fused"].shape == (len(keys[b]), 28, 24)
        peaks = maps["fused"].flatten(1).max(1).values  # every map peaks at 1 (CONTRACT.md)
        assert all(0.99 < p <= 1.0 for p in peaks.tolist())


@pytest.mark.parametrize("method", ["cam", "gradcam", "advcam"])
def test_a_class_no_branch_activates_gets_the_peak_of_its_raw_score(method):
    model = _model("amr")
    with torch.no_grad():  # features are >= 0 (ReLU, positive gates): class 2 scores < 0 everywhere
        for _, branch in model.branches():
            branch.classifier.weight[2] = -branch.classifier.weight[2].abs() - 0.01
    image = torch.randn(1, 3, 28, 24)
    icfg = InferConfig(method=method, scales=[1.0], adv_steps=2)
    (_, maps), = cams_for_batch(model, image, [torch.tensor([0, 2])], icfg)
    for name, branch in model.branches():
        # by hand: the raw score W_2 . F of the image plus that of its flip, flipped back, upsampled
        w = branch.classifier.weight[2, :, 0, 0]
        raw = torch.einsum("c,nchw->nhw", w, branch.features(image)) + \
            torch.einsum("c,nchw->nhw", w, branch.features(image.flip(-1))).flip(-1)
        raw = torch.nn.functional.interpolate(raw[None], size=(28, 24), mode="bilinear", align_corners=False)[0, 0]
        assert raw.max() < 0
        expected = (raw == raw.max()).float()
        assert 0 < expected.sum() < expected.numel()
        torch.testing.assert_close(maps[name][1], expected)
    assert maps["fused"][1].max() > 0.99 and maps["fused"][0].max() > 0.99  # class 0 keeps its ordinary map
    assert maps["active"].tolist() == [True, False]


def test_gradcam_closed_form_matches_autograd():
    feat = torch.randn(2, 6, 5, 4, requires_grad=True)
    weight = torch.randn(3, 6)
    closed = gradcam_maps(feat.detach(), weight)
    for n in range(2):
        for c in range(3):
            score = torch.relu(torch.einsum("k,khw->hw", weight[c], feat[n])).sum()
            (g,) = torch.autograd.grad(score, feat)
            g = g[n]
            a = g.sum(dim=(1, 2)) / (g > 0).flatten(1).sum(1).clamp(min=1)
            expected = torch.relu((a[:, None, None] * feat[n].detach()).sum(0))
            torch.testing.assert_close(closed[n, c], expected)


def test_advcam_all_classes_in_one_batch_equal_one_class_at_a_time():
    model = _model()
    icfg = InferConfig(method="advcam", adv_steps=3)
    x = torch.randn(1, 3, 32, 32)
    x2 = torch.cat([x, x.flip(-1)])
    k = torch.tensor([0, 2, 3])
    rows = torch.cat([x2[:1].expand(3, -1, -1, -1), x2[1:].expand(3, -1, -1, -1)])
    batched = _advcam_maps(model, rows, torch.cat([k, k]), icfg.adv_steps, icfg)
    for j, c in enumerate(k.tolist()):
        one = _advcam_maps(model, x2, torch.tensor([c, c]), icfg.adv_steps, icfg)
        for name in one:
            torch.testing.assert_close(one[name][0], batched[name][j], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(one[name][1], batched[name][3 + j], atol=1e-4, rtol=1e-4)
    # climbing changes the maps: more steps accumulate more than a single one
    single = _advcam_maps(model, rows, torch.cat([k, k]), 0, icfg)
    assert all(batched[n].sum() > single[n].sum() for n in batched)


@pytest.mark.parametrize("method", ["cam", "gradcam", "advcam"])
def test_a_symmetric_input_gives_symmetric_maps(method):
    model = _model()
    half = torch.randn(1, 3, 32, 16)
    image = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric
    icfg = InferConfig(method=method, scales=[1.0, 0.5], adv_steps=2)
    (_, maps), = cams_for_batch(model, image, [torch.tensor([1, 3])], icfg)
    for name, m in maps.items():
        torch.testing.assert_close(m, m.flip(-1), atol=1e-5, rtol=0)


@pytest.fixture
def trained_run(tiny_voc, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "amr"
    assert main(["train-cam", "--data", str(tiny_voc), "--split", "train", "--preset", "amr", "--out", str(run),
                 "--epochs", "1", "--backbone", "resnet18", "--base-width", "8", "--pretrained", "none",
                 "--crop", "32", "--batch-size", "4", "--device", "cpu", "--set", "train.num_workers=0"]) == 0
    return run


def test_make_cam_cli_files_invariants_and_rerun(tiny_voc, trained_run, tmp_path, capsys):
    cams = tmp_path / "cams"
    args = ["make-cam", "--run", str(trained_run), "--data", str(tiny_voc), "--split", "val", "--out", str(cams),
            "--scales", "1.0,0.5", "--batch-size", "3", "--save-branches", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 4 and summary["skipped"] == 0
    from amrseg.data.voc import open_dataset
    data = open_dataset(tiny_voc, "val")
    stamps = {}
    for i, iid in enumerate(data.ids):
        path = cams / f"{iid}.npz"
        with np.load(path, allow_pickle=False) as z:
            files = dict(z)
        assert files["keys"].dtype == np.int64
        assert files["keys"].tolist() == np.flatnonzero(data.labels[i]).tolist()
        h, w = data.load_image(i).shape[:2]
        assert files["high_res"].shape == (len(files["keys"]), h, w)
        assert files["high_res"].dtype in (np.float16, np.float32)
        hr = files["high_res"].astype(np.float32)
        assert hr.min() >= 0 and np.allclose(hr.reshape(len(hr), -1).max(1), 1.0, atol=1e-3)
        assert files["high_res_spotlight"].shape == files["high_res"].shape
        assert files["active"].dtype == np.bool_ and files["active"].shape == files["keys"].shape
        stamps[path] = (path.read_bytes(), os.stat(path).st_mtime_ns)
    # a re-run skips the finished files and leaves them untouched
    (cams / f"{data.ids[0]}.npz").unlink()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 1 and summary["skipped"] == 3
    for path, (content, mtime) in stamps.items():
        assert path.read_bytes() == content
        if path.name != f"{data.ids[0]}.npz":
            assert os.stat(path).st_mtime_ns == mtime
    # batch size does not change the maps
    args1 = args[:]
    args1[args1.index("--out") + 1] = str(tmp_path / "cams1")
    args1[args1.index("--batch-size") + 1] = "1"
    assert main(args1) == 0
    for iid in data.ids:
        np.testing.assert_allclose(load_cam(tmp_path / "cams1" / f"{iid}.npz")["high_res"].astype(np.float32),
                                   load_cam(cams / f"{iid}.npz")["high_res"].astype(np.float32), atol=1e-3)
    # the xi sweep reads the stored branches
    capsys.readouterr()
    assert main(["eval-cam", "--cams", str(cams), "--data", str(tiny_voc), "--split", "val",
                 "--sweep", "0.1:0.5:0.1", "--xi-sweep", "0:1:0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [round(x[0], 2) for x in result["xi_sweep"]] == [0.0, 0.5, 1.0] and 0 <= result["miou"] <= 1


def test_unlabelled_folder_uses_predicted_classes(trained_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (30, 40)), ("b.png", (24, 24)), ("c.jpg", (30, 40))):
        Image.fromarray(rng.integers(0, 255, (*size, 3)).astype(np.uint8)).save(folder / name)
    assert main(["make-cam", "--run", str(trained_run), "--data", str(folder), "--out", str(tmp_path / "c"),
                 "--scales", "1.0", "--device", "cpu", "--score-threshold", "0.5"]) == 0
    for stem, shape in (("a", (30, 40)), ("b", (24, 24)), ("c", (30, 40))):
        z = load_cam(tmp_path / "c" / f"{stem}.npz")
        assert len(z["keys"]) >= 1 and z["high_res"].shape[1:] == shape


def test_corrupt_npz_is_a_one_line_error(tiny_voc, trained_run, tmp_path, capsys):
    cams = tmp_path / "cams"
    assert main(["make-cam", "--run", str(trained_run), "--data", str(tiny_voc), "--split", "val", "--out",
                 str(cams), "--scales", "1.0", "--device", "cpu"]) == 0
    victim = sorted(cams.glob("*.npz"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    capsys.readouterr()
    assert main(["eval-cam", "--cams", str(cams), "--data", str(tiny_voc), "--split", "val", "--threshold", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and victim.name in err


def test_run_without_model_is_a_clear_error(tiny_voc, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["make-cam", "--run", str(tmp_path / "empty"), "--data", str(tiny_voc), "--split", "val",
                 "--out", str(tmp_path / "c")]) == 2
    assert "model.pt" in capsys.readouterr().err
