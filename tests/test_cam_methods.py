"""The CAM method contract (cam/methods.py, CamMethod) over every entry of CAM_METHODS, and a toy
method registered into a copy of the registry: make-cam's maths and pseudo-labels' defaults take it
with no other edit.

Each clause of the contract is a function of the method's name, run over the registry as it is at
collection: a method added to CAM_METHODS is checked without being named here.
"""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amrseg.cam import methods
from amrseg.cam.infer import InferConfig, cams_for_images, scale_batch, scale_pyramid
from amrseg.cam.methods import CAM_METHODS, CamMethod, pair_sum, per_image
from amrseg.config import load_preset, merge
from amrseg.errors import AmrsegError
from amrseg.models.amr import AMRNet
from contract import clause_list, contract_test

K = 4


def _model(preset: str = "amr-official", dtype=torch.float64) -> AMRNet:
    """resnet18 at width 8 with non-trivial BN statistics; amr-official: AMMs in every block with the
    pair statistics of make-cam (the case where an image's maps could depend on the batch)."""
    cfg = merge(load_preset(preset), {"model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"}})
    torch.manual_seed(0)
    model = AMRNet(cfg.model, cfg.amm, K).to(dtype)
    with torch.no_grad():
        model.train()((torch.randn(4, 3, 48, 48) * 1.3 + 0.2).to(dtype))
    return model.eval()


def _images(n: int, h: int = 37, w: int = 29, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 255, (6, 5, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR))
            for _ in range(n)]


def _maps(name: str, model: AMRNet, images: list[np.ndarray], keys: list, scale: float = 1.0):
    """(batch, method maps) of `images` at one scale, called as make-cam calls the method."""
    method = methods.CAM_METHODS[name]
    icfg = InferConfig(method=name, adv_steps=3)
    x = torch.stack([scale_pyramid(img, [scale])[0] for img in images]).to(next(model.parameters()).dtype)
    batch = scale_batch(model, x, list(keys), scale, icfg)
    with torch.inference_mode(not method.needs_grad):
        return batch, method.maps(model, batch)


CLAUSES, clause = clause_list()


@clause
def entry_is_well_formed(name: str) -> None:
    """Its key is its name; 0 < bg < fg < 1; a positive power; options are InferConfig fields and the
    defaults pass its check."""
    m = methods.CAM_METHODS[name]
    assert isinstance(m, CamMethod) and m.name == name and callable(m.maps) and isinstance(m.needs_grad, bool)
    fg, bg = m.thresholds
    assert 0 < bg < fg < 1
    assert math.isfinite(m.cam_power) and m.cam_power > 0
    assert set(m.options) <= {f.name for f in dataclasses.fields(InferConfig)}
    m.check(InferConfig(method=name))


@clause
def maps_have_the_contract_shape_and_values(name: str) -> None:
    """Every branch, every image; [n_b, h', w'] on the feature grid; finite, >= 0; not all 0; an
    image without keys gets [0, h', w']."""
    model = _model()
    keys = [torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([3, 1, 0])]
    batch, maps = _maps(name, model, _images(3), keys, scale=0.5)
    assert set(maps) == {n for n, _ in model.branches()}
    for branch, per in maps.items():
        grid = batch.scores[branch].shape[-2:]
        assert [tuple(m.shape) for m in per] == [(len(k), *grid) for k in keys]
        for m in per:
            assert torch.isfinite(m).all() and (m >= 0).all()
        assert sum(float(m.sum()) for m in per) > 0


@clause
def an_image_maps_depend_on_that_image_and_class_alone(name: str) -> None:
    """Batched with another image, for several classes = alone, for one class (row j is keys[j])."""
    model = _model()
    images = _images(2, seed=3)
    _, both = _maps(name, model, images, [torch.tensor([1]), torch.tensor([3, 0, 2])])
    for j, c in enumerate([3, 0, 2]):
        _, alone = _maps(name, model, images[1:], [torch.tensor([c])])
        for branch in both:
            torch.testing.assert_close(both[branch][1][j], alone[branch][0][0], rtol=1e-8, atol=1e-10)


@clause
def swapping_an_image_with_its_flip_flips_its_maps(name: str) -> None:
    model = _model()
    image = _images(1, seed=5)[0]
    keys = [torch.tensor([0, 1, 3])]
    _, maps = _maps(name, model, [image], keys)
    _, mirrored = _maps(name, model, [np.ascontiguousarray(image[:, ::-1])], keys)
    for branch in maps:
        torch.testing.assert_close(mirrored[branch][0], maps[branch][0].flip(-1), rtol=1e-6, atol=1e-9)


@clause
def needs_grad_is_what_the_method_does(name: str) -> None:
    """Measured: under torch.inference_mode a method that runs autograd fails, one that does not gives
    the maps it gives with gradients on."""
    method = methods.CAM_METHODS[name]
    model = _model("amr", torch.float32)
    images, keys = _images(1, seed=7), [torch.tensor([0, 2])]
    x = scale_pyramid(images[0], [1.0])[0][None]
    batch = scale_batch(model, x, keys, 1.0, InferConfig(method=name, adv_steps=2))
    if method.needs_grad:
        with torch.inference_mode(), pytest.raises(RuntimeError):
            method.maps(model, batch)
    else:
        with torch.inference_mode():
            fast = method.maps(model, batch)
        with torch.enable_grad():
            slow = method.maps(model, batch)
        for branch in slow:
            torch.testing.assert_close(fast[branch][0], slow[branch][0], rtol=0, atol=0)


@clause
def make_cam_serves_it(name: str) -> None:
    """Multi-scale, flip, fusion, normalisation: every stored map peaks at exactly 1 (CONTRACT.md)."""
    model = _model("amr", torch.float32)
    keys = [torch.tensor([0, 2]), None]  # None: the classes the classifier predicts
    results = cams_for_images(model, _images(2, 36, 28, seed=9), keys, InferConfig(method=name, scales=[1.0, 0.5],
                                                                                   adv_steps=2))
    for k, maps in results:
        n = len(k)
        assert n >= 1 and maps["active"].shape == (n,)
        assert maps["fused"].shape == (n, 36, 28) and maps["cam"].shape == (n, 9, 7)
        for key in ("fused", "cam", "spotlight", "compensation"):
            assert torch.isfinite(maps[key]).all() and maps[key].min() >= 0 and maps[key].max() <= 1
        for key in ("fused", "cam"):
            assert maps[key].flatten(1).amax(1).tolist() == [1.0] * n


test_contract = contract_test(CLAUSES, CAM_METHODS)


def test_an_unknown_method_lists_the_known_ones():
    with pytest.raises(AmrsegError) as err:
        cams_for_images(_model("cam", torch.float32), _images(1), [torch.tensor([0])], InferConfig(method="layercam"))
    msg = str(err.value)
    assert "\n" not in msg and "'layercam'" in msg and all(name in msg for name in CAM_METHODS)


# --------------------------------------------------------------------------- a method added to the registry


def _squared_cam(model, batch):
    """The toy method: the CAM of the pair, squared."""
    return {name: per_image(pair_sum(F.relu(s)) ** 2, batch.keys) for name, s in batch.scores.items()}


@pytest.fixture
def toy(monkeypatch):
    """CAM_METHODS plus 'toy', as a copy: the registry itself is left as it is."""
    entry = CamMethod("toy", _squared_cam, needs_grad=False, thresholds=(0.5, 0.2), cam_power=2.0)
    monkeypatch.setattr(methods, "CAM_METHODS", {**CAM_METHODS, "toy": entry})
    return entry


def test_a_registered_method_keeps_the_contract(toy):
    for check in CLAUSES:
        check("toy")


def test_make_cam_maths_take_a_registered_method(toy):
    """By hand: the squared pair CAM on the padded grid, cropped, divided by its max + 1e-5."""
    model = _model("cam", torch.float32)  # one branch: fused = the branch map renormalised to peak 1
    image = _images(1, 40, 20, seed=2)[0]  # 3 x 2 cells at stride 16, padded to 48 x 32
    x = scale_pyramid(image, [1.0])[0][None]
    w = model.spotlight.classifier.weight[:, :, 0, 0]
    with torch.no_grad():
        cam = lambda t: torch.relu(torch.einsum("kc,nchw->nkhw", w, model.spotlight.features(t)))  # noqa: E731
        m = ((cam(x) + cam(x.flip(-1)).flip(-1)) ** 2)[0]
    keys = m.flatten(1).amax(1).argsort(descending=True)[:2]  # two classes the CAM sees
    assert m[keys].flatten(1).amax(1).min() > 0
    m = m[keys]
    (_, maps), = cams_for_images(model, [image], [keys.clone()], InferConfig(method="toy", scales=[1.0]))
    up = F.interpolate(m[None], size=(48, 32), mode="bilinear", align_corners=False)[0, :, :40, :20]
    expected = up / (up.flatten(1).amax(1)[:, None, None] + 1e-5)
    torch.testing.assert_close(maps["spotlight"], expected, atol=1e-5, rtol=0)  # float32, squared
    plain = cams_for_images(model, [image], [keys.clone()], InferConfig(method="cam", scales=[1.0]))[0][1]
    assert (plain["spotlight"] - maps["spotlight"]).abs().max() > 0.05  # not the CAM under another name


def test_pseudo_labels_take_a_registered_method_thresholds(toy, tiny_voc, tmp_path, capsys):
    from amrseg.cam.io import load_cam, save_cam
    from amrseg.cli import main
    from amrseg.data.voc import open_dataset, read_mask
    from amrseg.cam.methods import DEFAULT_THRESHOLDS, default_cam_power

    assert DEFAULT_THRESHOLDS["toy"] == (0.5, 0.2) and default_cam_power("toy") == 2.0
    # CAMs of the toy method, recorded as such in cams.json: pseudo-labels picks its thresholds
    data = open_dataset(tiny_voc, "val")
    model = _model("amr", torch.float32)
    cams = tmp_path / "cams"
    cams.mkdir()
    for i, iid in enumerate(data.ids):
        (k, maps), = cams_for_images(model, [data.load_image(i)], [torch.from_numpy(np.flatnonzero(data.labels[i]))],
                                     InferConfig(method="toy", scales=[1.0]))
        save_cam(cams / f"{iid}.npz", keys=k.numpy().astype(np.int64), high_res=maps["fused"].numpy(),
                 cam=maps["cam"].numpy(), active=maps["active"].numpy())
    (cams / "cams.json").write_text(json.dumps({"method": "toy", "run": "x", "scales": [1.0], "xi": 0.5}))
    capsys.readouterr()
    out = tmp_path / "ir"
    assert main(["pseudo-labels", "--cams", str(cams), "--data", str(tiny_voc), "--split", "val", "--out", str(out),
                 "--method", "crf", "--no-crf", "--workers", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["cam_method"], summary["fg_threshold"], summary["bg_threshold"]) == ("toy", 0.5, 0.2)
    # by hand, from the stored maps: class above 0.5, background at or below 0.2, unknown between
    for iid in data.ids:
        z = load_cam(cams / f"{iid}.npz")
        hr = np.where(z["active"][:, None, None], z["high_res"].astype(np.float32), 0)
        top, arg = hr.max(0), z["keys"][hr.argmax(0)] + 1
        want = np.where(top > 0.5, arg, np.where(top <= 0.2, 0, 255))
        assert np.array_equal(read_mask(out / f"{iid}.png"), want)
