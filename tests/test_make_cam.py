"""make-cam: the release's reading (cam/reference.py), Grad-CAM by autograd and by hand, AdvCAM,
the pair statistics, the geometry, files, skipping, unlabelled data."""
import json
import os

import numpy as np
import yaml
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amrseg.cam.advcam import adv_steps_at, advcam_maps
from amrseg.cam.infer import InferConfig, cams_for_images, scale_pyramid, unit_peak
from amrseg.cam.methods import gradcam_from_scores, gradcam_maps
from amrseg.cam.io import load_cam
from amrseg.cam.reference import release_cams
from amrseg.cli import main
from amrseg.config import load_preset, merge
from amrseg.models.amr import AMRNet

K = 4


def _model(preset="amr", dtype=torch.float32, **amm):
    cfg = merge(load_preset(preset), {"model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"},
                                      "amm": amm})
    torch.manual_seed(0)
    model = AMRNet(cfg.model, cfg.amm, K).to(dtype)
    with torch.no_grad():  # non-trivial BN statistics, then inference
        model.train()((torch.randn(4, 3, 48, 48) * 1.3 + 0.2).to(dtype))
    return model.eval()


def _images(n, h, w, seed=0):
    """Smooth-ish uint8 images (upsampled noise), so that the maps have structure."""
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 255, (6, 5, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR))
            for _ in range(n)]


def _compare(maps, ref, atol):
    for res, prefix in (("hi", ""), ("lo", "cam_")):
        for name, expected in ref[res].items():
            if name == "fused":  # amrseg renormalises the release's fused map to peak 1 (AMR.md section 5)
                got, expected = maps["fused" if res == "hi" else "cam"], unit_peak(expected)
            else:
                got = maps[prefix + name]
            torch.testing.assert_close(got.double(), expected.double(), atol=atol, rtol=0)


@pytest.mark.parametrize("method", ["cam", "gradcam", "advcam"])
@pytest.mark.parametrize("preset", ["cam", "amr", "amr-official"])
def test_batched_maps_equal_the_release_reading(method, preset):
    # advcam in float64: the climb's hard decisions (the R_t mask, the positive count) turn float32
    # rounding into visible differences on random weights; in float64 the paths must agree.
    model = _model(preset, torch.float64 if method == "advcam" else torch.float32)
    images = _images(3, 37, 29)  # not multiples of the stride: the padded upsampling and the crop matter
    keys = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([0, 1, 3])]
    scales = [1.0, 0.5] if method == "advcam" else [1.0, 0.5, 1.5]
    icfg = InferConfig(method=method, scales=scales, xi=0.3, adv_steps=3)
    batched = cams_for_images(model, images, [k.clone() for k in keys], icfg)
    for b, (k, maps) in enumerate(batched):
        ref = release_cams(model, images[b], keys[b].tolist(), icfg.scales, icfg.xi, method, steps=3)
        assert k.tolist() == keys[b].tolist()
        _compare(maps, ref, atol=1e-4)
        assert maps["fused"].shape == (len(keys[b]), 37, 29) and maps["cam"].shape == (len(keys[b]), 10, 8)
        for name in ("fused", "cam"):  # every map peaks at exactly 1 (CONTRACT.md)
            assert maps[name].flatten(1).amax(1).tolist() == [1.0] * len(keys[b])


def test_pair_statistics_are_needed_for_the_release_maps():
    """amr-official's AMMs take their statistics over image + flip; per image they do not give the release's maps."""
    pair = _model("amr-official")
    own = _model("amr-official", eval_stats="sample")
    image = _images(1, 40, 36)[0]
    icfg = InferConfig(method="cam", scales=[1.0])
    ref = release_cams(pair, image, [0, 1], icfg.scales)
    (_, maps), = cams_for_images(pair, [image], [torch.tensor([0, 1])], icfg)
    (_, wrong), = cams_for_images(own, [image], [torch.tensor([0, 1])], icfg)
    torch.testing.assert_close(maps["compensation"], ref["hi"]["compensation"].float(), atol=1e-5, rtol=0)
    assert (wrong["compensation"] - ref["hi"]["compensation"].float()).abs().max() > 1e-3
    torch.testing.assert_close(wrong["spotlight"], maps["spotlight"])  # no AMM in the spotlight


def test_scale_pyramid_is_pil_bicubic_on_the_uint8_image():
    image = _images(1, 37, 29)[0]
    pyramid = scale_pyramid(image, [1.0, 0.5, 1.5])
    assert [tuple(x.shape[1:]) for x in pyramid] == [(37, 29), (18, 14), (56, 44)]  # 18.5, 14.5 round to even
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    small = np.asarray(Image.fromarray(image).resize((14, 18), Image.BICUBIC)).astype(np.float64)
    torch.testing.assert_close(pyramid[1], torch.from_numpy(((small / 255 - mean) / std).transpose(2, 0, 1)).float())
    # antialiased when shrinking: a one-pixel checkerboard halves to flat grey, not to one of its colours
    board = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    half = scale_pyramid(board, [0.5])[0]
    grey = (0.5 - 0.485) / 0.229
    assert abs(half[0, 4:-4, 4:-4].mean().item() - grey) < 0.05 and half[0, 4:-4, 4:-4].std() < 0.05


def test_padded_upsampling_and_crop_by_hand():
    """A map of one scale lands on the padded grid: feature cell i is centred on pixel os * i + os / 2."""
    model = _model("cam")
    image = _images(1, 40, 20)[0]  # 40 x 20 at stride 16: 3 x 2 cells, padded size 48 x 32
    icfg = InferConfig(method="cam", scales=[1.0])
    (_, maps), = cams_for_images(model, [image], [torch.tensor([1])], icfg)
    x = scale_pyramid(image, [1.0])[0][None]
    w = model.spotlight.classifier.weight[1, :, 0, 0]
    with torch.no_grad():
        m = torch.relu(torch.einsum("c,nchw->nhw", w, model.spotlight.features(x))) + \
            torch.relu(torch.einsum("c,nchw->nhw", w, model.spotlight.features(x.flip(-1)))).flip(-1)
    assert m.shape == (1, 3, 2)
    up = F.interpolate(m[None], size=(48, 32), mode="bilinear", align_corners=False)[0, 0, :40, :20]
    torch.testing.assert_close(maps["spotlight"][0], up / (up.max() + 1e-5), atol=1e-6, rtol=0)
    # the old stretch to 40 x 20 puts the cells elsewhere
    stretched = F.interpolate(m[None], size=(40, 20), mode="bilinear", align_corners=False)[0, 0]
    assert (stretched / stretched.max() - maps["spotlight"][0]).abs().max() > 0.05
    low = F.interpolate(m[None], size=(10, 5), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(maps["cam"][0], low / low.max(), atol=1e-6, rtol=0)


def test_output_stride_of_the_network_is_used():
    cfg = merge(load_preset("cam"), {"model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none",
                                               "strides": [1, 2, 1, 1]}})
    torch.manual_seed(0)
    model = AMRNet(cfg.model, cfg.amm, K).eval()
    assert model.output_stride == 8
    image = _images(1, 37, 29)[0]
    icfg = InferConfig(method="gradcam", scales=[1.0, 0.5])
    (_, maps), = cams_for_images(model, [image], [torch.tensor([0, 3])], icfg)
    _compare(maps, release_cams(model, image, [0, 3], icfg.scales, method="gradcam"), atol=1e-5)


@pytest.mark.parametrize("method", ["cam", "gradcam", "advcam"])
def test_a_class_no_branch_activates_gets_the_peak_of_its_raw_score(method):
    model = _model("amr")
    with torch.no_grad():  # features are >= 0 (ReLU, positive gates): class 2 scores < 0 everywhere
        for _, branch in model.branches():
            branch.classifier.weight[2] = -branch.classifier.weight[2].abs() - 0.01
    image = _images(1, 28, 24)[0]
    icfg = InferConfig(method=method, scales=[1.0], adv_steps=2)
    (_, maps), = cams_for_images(model, [image], [torch.tensor([0, 2])], icfg)
    x = scale_pyramid(image, [1.0])[0][None]
    for name, branch in model.branches():
        # by hand: the raw score W_2 . F of the image plus that of its flip, flipped back, on the padded grid
        w = branch.classifier.weight[2, :, 0, 0]
        with torch.no_grad():
            feats = branch.features(torch.cat([x, x.flip(-1)]))
        raw = torch.einsum("c,nchw->nhw", w, feats)
        raw = (raw[0] + raw[1].flip(-1))[None, None]
        assert raw.max() < 0
        for key, size in ((name, (28, 24)), ("cam_" + name, (7, 6))):
            up = (32, 32) if key == name else size
            r = F.interpolate(raw, size=up, mode="bilinear", align_corners=False)[0, 0, :size[0], :size[1]]
            expected = (r == r.max()).float()
            assert 0 < expected.sum() < expected.numel()
            torch.testing.assert_close(maps[key][1], expected)
    for name in ("fused", "cam"):  # class 0 keeps its ordinary map
        assert maps[name][1].max() == 1 and maps[name][0].max() == 1
    assert maps["active"].tolist() == [True, False]


def test_gradcam_by_hand():
    """One count P over the pair's whole gradient tensor, not one per channel (AMR.md section 5)."""
    # pair of two 1 x 2 maps, C = 2, K = 1, W = [1, -1]: raw_0 = [2, -1], raw_1 = [2, 1]
    feat = torch.tensor([[[[[3.0, 1.0]], [[1.0, 2.0]]], [[[2.0, 2.0]], [[0.0, 1.0]]]]])  # [1, 2, 2, 1, 2]
    weight = torch.tensor([[1.0, -1.0]])
    # the gradient is W_k on the positive positions: positive entries are channel 0's, 1 + 2 = 3 = P;
    # a_0 = W * |mask_0| / P = W / 3, a_1 = W * 2 / 3
    expected = torch.tensor([[[[[2 / 3, 0.0]]], [[[4 / 3, 2 / 3]]]]])
    torch.testing.assert_close(gradcam_maps(feat, weight), expected)
    # a per-channel count (the old rule) would give channel 1 the weight -1 / 1 while channel 0 has 1 / 1


def test_gradcam_closed_form_matches_autograd():
    torch.manual_seed(1)
    feat = torch.randn(2, 2, 6, 5, 4).relu().requires_grad_(True)
    weight = torch.randn(3, 6)
    closed = gradcam_maps(feat.detach(), weight)
    for b in range(2):
        for c in range(3):
            score = torch.relu(torch.einsum("k,nkhw->nhw", weight[c], feat[b])).sum()  # over image and flip
            (g,) = torch.autograd.grad(score, feat)
            g = g[b]
            a = g.sum(dim=(2, 3)) / ((g > 0).sum() + 1e-12)  # [2, C]; one count for the pair
            expected = torch.relu((a[:, :, None, None] * feat[b].detach()).sum(1))
            torch.testing.assert_close(closed[b, :, c], expected)


def test_gradcam_does_not_collapse_on_random_weights():
    """The release's Grad-CAM is the ReLU CAM times a positive scalar: alive wherever the CAM is."""
    model = _model("amr")
    x = torch.randn(3, 2, 3, 48, 40)
    for name, branch in model.branches():
        with torch.no_grad():
            f = branch.features(x.flatten(0, 1)).unflatten(0, (3, 2))
        w = branch.classifier.weight.flatten(1)
        raw = torch.einsum("kc,bnchw->bnkhw", w, f)
        gc = gradcam_maps(f, w)
        alive = raw.relu().flatten(3).amax(-1) > 0
        assert alive.sum() >= 12  # most of the 24 maps
        assert torch.equal(gc.flatten(3).amax(-1) > 0, alive)
        ratio = gc / raw.relu().clamp(min=1e-12)
        pos = raw > 0
        per_map = torch.where(pos, ratio, torch.nan)
        spread = per_map.flatten(3).nan_to_num(0).amax(-1) - per_map.flatten(3).nan_to_num(1e9).amin(-1)
        assert spread[alive].abs().max() < 1e-6 * ratio[pos].max()
        torch.testing.assert_close(gradcam_from_scores(raw, w), gc)


def test_advcam_all_classes_in_one_batch_equal_one_class_at_a_time():
    model = _model(dtype=torch.float64)
    icfg = InferConfig(method="advcam")
    x = scale_pyramid(_images(1, 32, 32)[0], [1.0])[0].double()
    pair = torch.stack([x, x.flip(-1)])[None]
    k = torch.tensor([0, 2, 3])
    batched = advcam_maps(model, pair.expand(3, -1, -1, -1, -1), k, 4, icfg)
    for j, c in enumerate(k.tolist()):
        one = advcam_maps(model, pair, torch.tensor([c]), 4, icfg)
        for name in one:
            torch.testing.assert_close(one[name][0], batched[name][j], atol=1e-10, rtol=1e-8)
    # T maps: one step gives exactly the Grad-CAM of the input; climbing accumulates more
    single = advcam_maps(model, pair.expand(3, -1, -1, -1, -1), k, 1, icfg)
    for name, branch in model.branches():
        with torch.no_grad():
            gc = gradcam_maps(branch.features(pair[0]).unsqueeze(0), branch.classifier.weight.flatten(1))[0]
        torch.testing.assert_close(single[name], gc[0, k] + gc[1, k].flip(-1))
        assert batched[name].sum() > single[name].sum()


def test_advcam_climb_per_branch_or_joint():
    icfg = InferConfig(method="advcam")
    x = scale_pyramid(_images(1, 32, 32)[0], [1.0])[0].double()
    pair = torch.stack([x, x.flip(-1)])[None]
    one = _model("cam", torch.float64)  # one branch: the two climbs are the same
    torch.testing.assert_close(advcam_maps(one, pair, torch.tensor([1]), 4, icfg)["spotlight"],
                               advcam_maps(one, pair, torch.tensor([1]), 4, InferConfig(adv_climb="joint"))["spotlight"])
    two = _model("amr", torch.float64)
    branch = advcam_maps(two, pair, torch.tensor([1]), 4, icfg)
    joint = advcam_maps(two, pair, torch.tensor([1]), 4, InferConfig(adv_climb="joint"))
    assert (branch["compensation"] - joint["compensation"]).abs().max() > 1e-6


def test_advcam_steps_per_scale_follow_the_release():
    assert [adv_steps_at(0.5, t) for t in (27, 11, 10, 6, 5, 1)] == [13, 5, 5, 5, 5, 1]
    assert [adv_steps_at(s, 27) for s in (1.0, 1.5, 2.0, 0.75)] == [27] * 4


@pytest.mark.parametrize("method", ["cam", "gradcam", "advcam"])
def test_a_symmetric_input_gives_symmetric_maps(method):
    model = _model()
    half = _images(1, 32, 16)[0]
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # mirror-symmetric, 32 x 32: a multiple of the stride
    icfg = InferConfig(method=method, scales=[1.0, 0.5], adv_steps=2)
    (_, maps), = cams_for_images(model, [image], [torch.tensor([1, 3])], icfg)
    for name, m in maps.items():
        if name != "active":
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
        # the stride-4 map of IRN: [n, ceil(H/4), ceil(W/4)], each class peaking at exactly 1
        assert files["cam"].shape == (len(files["keys"]), -(-h // 4), -(-w // 4))
        assert files["cam"].reshape(len(files["keys"]), -1).max(1).tolist() == [1.0] * len(files["keys"])
        assert files["active"].dtype == np.bool_ and files["active"].shape == files["keys"].shape
        stamps[path] = (path.read_bytes(), os.stat(path).st_mtime_ns)
        if i == 0:
            files_first = files
    # a re-run skips the finished files and leaves them untouched
    (cams / f"{data.ids[0]}.npz").unlink()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 1 and summary["skipped"] == 3
    for path, (content, mtime) in stamps.items():
        if path.name != f"{data.ids[0]}.npz":
            assert path.read_bytes() == content and os.stat(path).st_mtime_ns == mtime
        else:  # recomputed alone instead of in a batch of 3: equal up to float32 rounding (float16 storage)
            with np.load(path, allow_pickle=False) as z:
                again = dict(z)
            for name, value in again.items():
                np.testing.assert_allclose(value.astype(np.float64), files_first[name].astype(np.float64), atol=1e-3)
    # batch size does not change the maps
    args1 = args[:]
    args1[args1.index("--out") + 1] = str(tmp_path / "cams1")
    args1[args1.index("--batch-size") + 1] = "1"
    assert main(args1) == 0
    for iid in data.ids:
        for name in ("high_res", "cam"):
            np.testing.assert_allclose(load_cam(tmp_path / "cams1" / f"{iid}.npz")[name].astype(np.float32),
                                       load_cam(cams / f"{iid}.npz")[name].astype(np.float32), atol=1e-3)
    # the xi sweep reads the stored branches
    capsys.readouterr()
    assert main(["eval-cam", "--cams", str(cams), "--data", str(tiny_voc), "--split", "val",
                 "--sweep", "0.1:0.5:0.1", "--xi-sweep", "0:1:0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [round(x[0], 2) for x in result["xi_sweep"]] == [0.0, 0.5, 1.0] and 0 <= result["miou"] <= 1


def test_a_rerun_with_other_settings_is_refused_and_overwrite_remakes(tiny_voc, trained_run, tmp_path, capsys):
    cams = tmp_path / "cams"
    args = ["make-cam", "--run", str(trained_run), "--data", str(tiny_voc), "--split", "val", "--out", str(cams),
            "--scales", "1.0", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    made = yaml.safe_load((cams / "config.yaml").read_text())
    assert (made["method"], made["scales"], made["xi"]) == ("cam", [1.0], 0.5) and "batch_size" not in made
    before = {p.name: p.read_bytes() for p in cams.glob("*.npz")}
    # Other method, other scales: refused in one line naming each difference; nothing is touched.
    assert main([*args[:-4], "--scales", "1.0,0.5", "--method", "gradcam", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert "method 'cam' -> 'gradcam'" in err and "scales [1.0] -> [1.0, 0.5]" in err
    assert {p.name: p.read_bytes() for p in cams.glob("*.npz")} == before
    assert json.loads((cams / "cams.json").read_text())["method"] == "cam"
    # The batch size does not change the maps: a re-run with another one finishes the folder.
    (cams / sorted(before)[0]).unlink()
    assert main([*args, "--batch-size", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 1
    # --overwrite makes every file again with the new settings, and records them.
    assert main([*args[:-4], "--scales", "1.0,0.5", "--method", "gradcam", "--device", "cpu", "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == len(before)
    assert yaml.safe_load((cams / "config.yaml").read_text())["method"] == "gradcam"
    assert json.loads((cams / "cams.json").read_text())["method"] == "gradcam"
    # pseudo-labels reads the new method's thresholds
    assert main(["pseudo-labels", "--cams", str(cams), "--data", str(tiny_voc), "--split", "val", "--out",
                 str(tmp_path / "ir"), "--method", "crf", "--no-crf", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["cam_method"] == "gradcam"


def test_a_file_not_written_fails_the_run_loudly(tiny_voc, trained_run, tmp_path, capsys, monkeypatch):
    import amrseg.stages.make_cam as stage

    real = stage.save_cam
    monkeypatch.setattr(stage, "save_cam", lambda path, **kw: None if path.name.endswith("_001.npz") else
                        real(path, **kw))
    cams = tmp_path / "cams"
    assert main(["make-cam", "--run", str(trained_run), "--data", str(tiny_voc), "--split", "val", "--out",
                 str(cams), "--scales", "1.0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of the 4 CAM files were not written" in err and "val_001.npz" in err


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
