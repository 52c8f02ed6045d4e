"""Emoji art, emoji-VOC scenes and emoji pretraining, on the fake art of conftest (never the real art)."""
import io
import json
import os
import shutil
import stat
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from amrseg.cli import main
from amrseg.data import emoji_art as ea
from amrseg.data import emoji_scenes as es
from amrseg.data.voc import IGNORE, VOC_CLASSES, open_dataset, read_mask
from amrseg.errors import AmrsegError


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the art folder


def test_check_art_reads_the_index(emoji_art):
    root, index = ea.check_art(emoji_art)
    assert root == emoji_art
    by_name = {e.short_name: e for e in index}
    runner = by_name["runner"]
    assert runner.vendors == ("twitter", "google") and len(runner.images["google"]) == 3  # base + 2 skins
    assert [e.sort_order for e in index] == sorted(e.sort_order for e in index)


def test_missing_or_incomplete_art_is_one_line_naming_the_folder(emoji_art, tmp_path, monkeypatch, capsys):
    with pytest.raises(AmrsegError) as e:
        ea.check_art(tmp_path / "nothing")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'nothing'}: ") and "amrseg fetch-art" in msg and "\n" not in msg
    broken = tmp_path / "broken"
    shutil.copytree(emoji_art, broken)
    victim = next((broken / "img" / "google" / "64").iterdir())
    victim.unlink()
    with pytest.raises(AmrsegError, match=r"incomplete emoji art \(1 missing.*amrseg fetch-art"):
        ea.check_art(broken)
    # The default folder: $AMRSEG_ART.
    monkeypatch.setenv("AMRSEG_ART", str(broken))
    assert ea.art_dir() == broken
    # Through the CLI: exit 2, one line on stderr, for both commands that read art.
    for argv in (["build-scenes", str(tmp_path / "out"), "--source", "emoji", "--train", "2", "--val", "1"],
                 ["pretrain-backbone", "--out", str(tmp_path / "w.pt"), "--source", "emoji", "--art",
                  str(tmp_path / "nothing")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "amrseg fetch-art" in err


def _package(tmp_path, art, vendor, hostile=False):
    """A tarball laid out like the npm package, with files fetch-art must leave behind."""
    path = tmp_path / f"emoji-datasource-{vendor}-16.0.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(art / "emoji.json", "package/emoji.json")
        tar.add(art / "emoji.json", "package/emoji_pretty.json")
        for png in sorted((art / "img" / vendor / "64").iterdir()):
            tar.add(png, f"package/img/{vendor}/64/{png.name}")
            tar.add(png, f"package/img/{vendor}/32/{png.name}")
        if hostile:
            data = b"evil"
            for name in ("../evil.png", f"package/img/{vendor}/64/../../../../evil.png", "/tmp/evil.png"):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_fetch_art_from_tarballs_keeps_only_the_art_and_skips_what_is_there(emoji_art, tmp_path):
    pkgs = [_package(tmp_path, emoji_art, v, hostile=True) for v in ea.VENDORS]
    dest = tmp_path / "deep" / "art"
    out = ea.fetch_art(dest, tarballs=pkgs, log=lambda m: None)
    assert out["fetched"] == ["twitter", "google"] and out["emoji"] == len(ea.parse_index(emoji_art / "emoji.json"))
    assert _tree(dest) == _tree(emoji_art)  # emoji.json + img/<vendor>/64/*.png and nothing else
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "deep" / "evil.png").exists()
    assert ea.fetch_art(dest, tarballs=pkgs, log=lambda m: None)["fetched"] == []
    # A vendor folder lost: only that vendor comes back.
    shutil.rmtree(dest / "img" / "google")
    assert ea.fetch_art(dest, tarballs=pkgs, log=lambda m: None)["fetched"] == ["google"]
    assert _tree(dest) == _tree(emoji_art)


def test_interrupted_fetch_never_looks_complete(emoji_art, tmp_path, monkeypatch):
    pkgs = [_package(tmp_path, emoji_art, v) for v in ea.VENDORS]
    dest = tmp_path / "art"
    real = ea.extract_package

    def dies_on_google(tgz, vendor, stage, log):
        if vendor == "google":
            raise KeyboardInterrupt
        return real(tgz, vendor, stage, log)

    monkeypatch.setattr(ea, "extract_package", dies_on_google)
    with pytest.raises(KeyboardInterrupt):
        ea.fetch_art(dest, tarballs=pkgs, log=lambda m: None)
    with pytest.raises(AmrsegError, match="amrseg fetch-art"):
        ea.check_art(dest)
    assert [p.name for p in dest.iterdir()] == []  # the staging folder went with the interruption
    monkeypatch.setattr(ea, "extract_package", real)
    assert ea.fetch_art(dest, tarballs=pkgs, log=lambda m: None)["fetched"] == ["twitter", "google"]
    ea.check_art(dest)


def test_fetch_art_runs_npm_pack(emoji_art, tmp_path, monkeypatch):
    """A stand-in `npm` on PATH that 'packs' local tarballs: the command line fetch-art runs."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    for v in ea.VENDORS:
        _package(pkgs, emoji_art, v)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!{sys.executable}\nimport pathlib, shutil, sys\n"
                   f"pathlib.Path({str(tmp_path / 'npm-args')!r}).write_text(' '.join(sys.argv[1:]))\n"
                   f"for t in pathlib.Path({str(pkgs)!r}).glob('*.tgz'): shutil.copy(t, '.')\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    dest = tmp_path / "art"
    assert main(["fetch-art", str(dest)]) == 0
    assert (tmp_path / "npm-args").read_text().split() == [
        "pack", "--silent", "emoji-datasource-twitter@16.0.0", "emoji-datasource-google@16.0.0"]
    assert _tree(dest) == _tree(emoji_art)


def test_fetch_art_without_npm_says_how_to_get_the_packages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    monkeypatch.setenv("AMRSEG_ART", str(tmp_path / "art"))
    assert main(["fetch-art"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("amrseg: error: npm not found")
    for v in ea.VENDORS:
        assert f"https://registry.npmjs.org/emoji-datasource-{v}/-/emoji-datasource-{v}-16.0.0.tgz" in err
    assert "--tarballs" in err
    assert not (tmp_path / "art" / "emoji.json").exists()


# --------------------------------------------------------------------------- classes.json


def test_package_spec_is_voc():
    spec = es.read_spec()
    assert list(spec["classes"]) == list(VOC_CLASSES[1:]) and spec["classes"]["diningtable"] == []
    assert all(spec["classes"][c] for c in VOC_CLASSES[1:] if c != "diningtable")
    # Every context emoji has a placement rule of its own (none falls back to 'beside' by default).
    for names in spec["context"].values():
        assert all(n in es.CONTEXT_PLACEMENT for n in names), names


def test_resolve_spec_clutter(emoji_art):
    spec = es.resolve_spec(emoji_art)
    assert spec.class_names == list(VOC_CLASSES[1:]) and spec.class_art[VOC_CLASSES.index("diningtable") - 1] == []
    # Clutter: the clutter categories, minus excluded subcategories, class/context art and lookalikes.
    assert sorted(e.short_name for e in spec.clutter) == ["apple", "hammer", "kite"]
    assert [e.short_name for e in spec.context[VOC_CLASSES.index("train") - 1]] == ["railway_track"]


def test_resolve_spec_names_a_missing_emoji(emoji_art, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(emoji_art, art)
    entries = [e for e in json.loads((art / "emoji.json").read_text()) if e["short_name"] != "penguin"]
    (art / "emoji.json").write_text(json.dumps(entries))
    with pytest.raises(AmrsegError, match=r"no emoji 'penguin' \(class bird in "):
        es.resolve_spec(art)


# --------------------------------------------------------------------------- rendering


def test_paint_composites_and_labels_alpha_half():
    canvas = Image.new("RGB", (8, 6), (100, 100, 100))
    alpha = np.array([[0, 51, 128], [127, 255, 179]], np.uint8)
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (230, 25, 77)
    rgba[..., 3] = alpha
    sprite = es.Sprite(Image.fromarray(rgba, "RGBA"))
    labels, parts = np.zeros((6, 8), np.uint8), np.full((6, 8), 9, np.uint8)
    es.paint(canvas, sprite, 4, 5, ((labels, 3), (parts, 0)))  # the sprite's top-left at (4, 5): whole
    a = alpha[..., None] / 255.0
    expected = a * np.array([230, 25, 77]) + (1 - a) * 100  # "over" with straight alpha
    out = np.asarray(canvas).astype(float)
    np.testing.assert_allclose(out[4:6, 5:8], expected, atol=1.0)
    assert (out[:4] == 100).all() and (out[:, :5] == 100).all()
    assert labels[4:, 5:].tolist() == [[0, 0, 3], [0, 3, 3]] and labels.sum() == 9  # alpha >= 0.5
    assert (parts == 0).sum() == 3
    # Truncation: only the part inside the canvas is painted and labelled.
    labels[:] = 0
    canvas = Image.new("RGB", (8, 6))
    es.paint(canvas, sprite, -1, 6, ((labels, 1),))  # only row 1, columns 0-1 fall inside
    assert labels[0].tolist() == [0] * 7 + [1] and labels[1:].sum() == 0
    row = np.asarray(canvas)[0, 6:].astype(float)  # alpha 127 (painted at half, not labelled), then 255
    np.testing.assert_allclose(row, [np.array([230, 25, 77]) * 127 / 255, [230, 25, 77]], atol=1.0)
    assert np.asarray(canvas)[1:].max() == 0 and np.asarray(canvas)[0, :6].max() == 0


def test_object_mask_bands_borders_and_drops_mostly_hidden_objects():
    inst = np.zeros((20, 20), np.uint8)
    inst[2:10, 2:10] = 1  # 64 px visible of a 70 px object: kept
    inst[10:16, 10:18] = 2  # touches object 1 at one corner; 48 px visible of a 100 px object: hidden
    inst[14:20, 0:6] = 3  # whole, but 25 px after the band (the image edge is no border): too small
    mask = es.object_mask(inst, [(4, 70), (7, 100), (9, 36)], min_pixels=30)  # object 1 keeps 36 px
    # Independent reference: 255 where the 8-neighbourhood holds another object id.
    ref = np.where(inst == 1, 5, 0).astype(np.uint8)
    ref[(inst == 2) | (inst == 3)] = IGNORE
    for y in range(20):
        for x in range(20):
            nb = inst[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
            if (nb != inst[y, x]).any():
                ref[y, x] = IGNORE
    np.testing.assert_array_equal(mask, ref)
    assert set(np.unique(mask).tolist()) == {0, 5, IGNORE}


def _check_scene(image, mask, parts, size):
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert mask.shape == parts.shape == (size, size)
    values = set(np.unique(mask).tolist())
    assert values <= set(range(21)) | {IGNORE} and VOC_CLASSES.index("diningtable") not in values
    present = [c for c in values if 0 < c < IGNORE]
    assert 1 <= len(present) <= 3
    # Labelled pixels are object pixels; context and clutter are background (0) or band (255).
    assert (parts[(mask > 0) & (mask < IGNORE)] == es.PART_OBJECT).all()
    assert set(np.unique(mask[parts == es.PART_CONTEXT]).tolist()) <= {0, IGNORE}
    assert set(np.unique(mask[parts == es.PART_CLUTTER]).tolist()) <= {0, IGNORE}
    # The band: no two different labels touch in the 8-neighbourhood.
    p = np.pad(mask, 1, mode="edge")
    for dy in range(3):
        for dx in range(3):
            nb = p[dy:dy + size, dx:dx + size]
            assert not ((nb != mask) & (nb != IGNORE) & (mask != IGNORE)).any()
    return present


def test_render_scene_ground_truth_and_context(emoji_art):
    spec = es.resolve_spec(emoji_art)
    sprites = es.SpriteCache(emoji_art)
    seen_context = 0
    for i in range(12):
        image, mask, parts, comp = es.render_scene(np.random.default_rng([4, i]), 96, spec, sprites, 1.0)
        _check_scene(image, mask, parts, 96)
        assert comp.context_rate == 1.0
        seen_context += (parts == es.PART_CONTEXT).any()
        image0, mask0, parts0, comp0 = es.render_scene(np.random.default_rng([4, i]), 96, spec, sprites, 0.0)
        _check_scene(image0, mask0, parts0, 96)
        assert comp0.context_rate == 0.0 and not (parts0 == es.PART_CONTEXT).any()
    assert seen_context >= 8  # every object brings its context (classes without context aside)


def test_composition_knobs_scale_and_count_the_objects(emoji_art):
    spec, sprites = es.resolve_spec(emoji_art), es.SpriteCache(emoji_art)

    def scenes(**knobs):
        return [es.render_scene(np.random.default_rng([5, i]), 96, spec, sprites, 0.0, **knobs) for i in range(12)]

    def foreground(rendered):
        return sum(int(((mask > 0) & (mask != 255)).sum()) for _, mask, _, _ in rendered)

    # area goes with the square of the scale: (0.6 / 1.4)^2 = 0.18; truncation at 1.4 lifts it a little
    assert foreground(scenes(object_scale=0.6)) < 0.4 * foreground(scenes(object_scale=1.4))
    assert {comp.n_objects for *_, comp in scenes(count_weights=[1.0, 0.0, 0.0])} == {1}
    assert {comp.n_objects for *_, comp in scenes(count_weights=[0.0, 0.0, 1.0])} == {3}
    # the defaults draw exactly what the scenes always drew
    for (a, ma, _, _), (b, mb, _, _) in zip(scenes(), scenes(object_scale=1.0, count_weights=es.COUNT_WEIGHTS)):
        assert np.array_equal(a, b) and np.array_equal(ma, mb)


def test_build_scenes_records_the_composition_and_checks_it(emoji_art, tmp_path, capsys):
    out = tmp_path / "held"
    base = ["build-scenes", str(out), "--source", "emoji", "--art", str(emoji_art), "--train", "2", "--val", "2",
            "--size", "80"]
    assert main([*base, "--object-scale", "0.8", "--count-weights", "0.25,0.35,0.4"]) == 0
    capsys.readouterr()
    recorded = json.loads((out / "scenes.json").read_text())
    assert recorded["object_scale"] == 0.8 and recorded["count_weights"] == [0.25, 0.35, 0.4]
    assert main([*base, "--object-scale", "0.9", "--count-weights", "0.25,0.35,0.4"]) == 2  # other settings
    assert "built with other settings" in capsys.readouterr().err
    default = tmp_path / "default"
    assert main(["build-scenes", str(default), *base[2:]]) == 0
    assert "object_scale" not in json.loads((default / "scenes.json").read_text())  # unchanged knobs: not recorded
    capsys.readouterr()
    for flags, message in ((["--object-scale", "3"], "--object-scale 3.0: must lie in [0.25, 2]"),
                           (["--count-weights", "0.5,0.5"], "--count-weights 0.5,0.5: need three probabilities"),
                           (["--count-weights", "a,b,c"], "--count-weights 'a,b,c': expected comma-separated numbers")):
        assert main(["build-scenes", str(tmp_path / "bad"), *base[2:], *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["build-scenes", str(tmp_path / "f"), "--source", "fashion", "--object-scale", "0.8"]) == 2
    assert "--object-scale: only for --source emoji" in capsys.readouterr().err


# --------------------------------------------------------------------------- the dataset


@pytest.fixture(scope="module")
def emoji_scenes(tmp_path_factory, emoji_art):
    out = tmp_path_factory.mktemp("emoji-scenes") / "root"
    calls = []
    info = es.build_emoji_scenes(out, art=emoji_art, n_train=10, n_val=4, size=80, seed=0, progress=calls.append)
    return out, info, calls


def test_build_emoji_scenes_layout_and_labels(emoji_scenes):
    root, info, calls = emoji_scenes
    names = list(VOC_CLASSES[1:])
    assert calls == [1] * 14 and info["rendered"] == 14 and info["images_per_s"] > 0
    assert (root / "classes.txt").read_text().split() == list(VOC_CLASSES)
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == [f"train_{i:06d}" for i in range(10)]
    lines = (root / "cls_labels.csv").read_text().split()
    assert lines[0] == "image_id," + ",".join(names)
    rows = {ln.split(",")[0]: [int(v) for v in ln.split(",")[1:]] for ln in lines[1:]}
    assert len(rows) == 14 and not list(root.rglob(".*tmp"))
    for image_id, row in rows.items():
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as m:
            assert m.mode == "P"
        mask = read_mask(root / "SegmentationClass" / f"{image_id}.png")
        parts = np.asarray(Image.open(root / "SegmentationContext" / f"{image_id}.png"))
        image = np.asarray(Image.open(root / "JPEGImages" / f"{image_id}.jpg"))
        present = _check_scene(image, mask, parts, 80)
        assert row == [int(c in present) for c in range(1, 21)]  # labels = classes present in the mask
    data = open_dataset(root, "val")
    assert len(data) == 4 and data.class_names == list(VOC_CLASSES)
    assert info["images_per_class"] == {n: int(sum(r[k] for r in rows.values())) for k, n in enumerate(names)}


def test_build_emoji_scenes_deterministic_resumable_and_refuses_other_settings(emoji_scenes, emoji_art, tmp_path):
    root, _, _ = emoji_scenes
    again = tmp_path / "again"
    assert main(["build-scenes", str(again), "--source", "emoji", "--art", str(emoji_art), "--train", "10", "--val",
                 "4", "--size", "80"]) == 0
    assert _tree(again) == _tree(root)  # same seed: the same bytes
    # An interrupted build: some images missing (and a stray temporary file); the re-run finishes them.
    (again / "SegmentationClass" / "train_000003.png").unlink()
    (again / "JPEGImages" / "val_000001.jpg").unlink()
    (again / "JPEGImages" / ".train_000004.jpg.abc.tmp").write_bytes(b"partial")
    info = es.build_emoji_scenes(again, art=emoji_art, n_train=10, n_val=4, size=80, seed=0)
    assert info["rendered"] == 2
    (again / "JPEGImages" / ".train_000004.jpg.abc.tmp").unlink()
    assert _tree(again) == _tree(root)
    with pytest.raises(AmrsegError, match="built with other settings"):
        es.build_emoji_scenes(again, art=emoji_art, n_train=10, n_val=4, size=80, seed=1)
    other = tmp_path / "other"
    es.build_emoji_scenes(other, art=emoji_art, n_train=10, n_val=4, size=80, seed=1)
    jpegs = [k for k in _tree(root) if k.endswith(".jpg")]
    assert len(jpegs) == 14 and all((root / k).read_bytes() != (other / k).read_bytes() for k in jpegs)


def test_build_scenes_cli_errors(emoji_art, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["build-scenes", out, "--source", "emoji", "--art", str(emoji_art), "--context-prob", "1.5"]) == 2
    assert "--context-prob 1.5" in capsys.readouterr().err
    assert main(["build-scenes", out, "--source", "fashion", "--context-prob", "0.3"]) == 2
    assert "--context-prob: only for --source emoji" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["build-scenes", out, "--source", "voc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'voc'" in err


# --------------------------------------------------------------------------- pretraining


def test_emoji_item_dataset(emoji_art):
    spec = es.resolve_spec(emoji_art)
    sprites = es.SpriteCache(emoji_art)
    ds = es.EmojiItemDataset(spec.index, spec.clutter, sprites, size=40, length=30, seed=3)
    n = len(spec.index)
    assert ds.num_classes == n == len(json.loads((emoji_art / "emoji.json").read_text()))
    x, y = ds[n + 2]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and y == 2  # item i shows class i % n
    assert torch.equal(es.EmojiItemDataset(spec.index, spec.clutter, sprites, 40, 30, seed=3)[n + 2][0], x)
    ds.set_epoch(1)
    assert not torch.equal(ds[n + 2][0], x)


def test_pretrain_backbone_emoji(emoji_art, tmp_path):
    from amrseg.engine.pretrain import PretrainConfig, pretrain_backbone
    from amrseg.models.resnet import build_resnet, load_pretrained

    cfg = PretrainConfig.for_source("emoji", base_width=8, epochs=1, size=32, items=32, batch_size=16, test_items=24,
                                    num_workers=0)
    assert cfg.source == "emoji" and cfg.aux_weight > 0 and cfg.zero_init_residual and cfg.threads == -1
    out = tmp_path / "w.pt"
    threads = torch.get_num_threads()
    summary = pretrain_backbone(out, cfg, art=str(emoji_art), show_progress=False)
    assert torch.get_num_threads() == threads  # restored
    assert summary["threads"] == max(1, (os.cpu_count() or 1) - cfg.num_workers)
    n = len(es.resolve_spec(emoji_art).index)
    assert summary["num_classes"] == n and summary["test_items"] == 24
    assert 0.0 <= summary["test_accuracy"] <= summary["test_top5"] <= 1.0
    state = torch.load(out, weights_only=True)
    assert state["fc.weight"].shape == (n, 64) and not [k for k in state if k.startswith("aux")]
    model = build_resnet("resnet18", 8)
    load_pretrained(model, str(out), "resnet18")  # torchvision names, strict
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_zero_init_residual_makes_every_block_the_identity():
    from amrseg.engine.pretrain import zero_init_residual
    from amrseg.models.resnet import build_resnet

    for name in ("resnet18", "resnet50"):
        model = build_resnet(name, 8, strides=(1, 2, 2, 2)).eval()
        zero_init_residual(model)
        x = torch.randn(2, model.layer1[0].conv1.in_channels, 16, 16)
        for layer in (model.layer1, model.layer2):
            for block in layer:
                y = block(x)
                # A zero branch: relu(identity path), which is x itself for blocks without a downsample.
                if block.downsample is None:
                    assert torch.equal(y, torch.relu(x))
                x = y
