"""Speed benchmark: prints a table of figures measured in one run.

- train-cam step throughput (forward + backward + SGD) per preset, on CPU, and on CUDA when present
  (fp32 against autocast + channels_last);
- make-cam: batched against the slow reading of the release (cam/reference.py: per image, branch,
  class and scale, autograd for Grad-CAM), maps checked equal;
- advcam: climbing for all of an image's classes in one batch against one class at a time;
- eval-cam: a 19-threshold sweep in one pass against 19 single-threshold passes.

Usage: python bench/speed.py [--images 32] [--size 128] [--parts train,make-cam,advcam,eval-cam]
       [--out bench/out/speed.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from amrseg.cam.advcam import advcam_maps  # noqa: E402
from amrseg.cam.infer import InferConfig, cams_for_images, scale_pyramid, unit_peak  # noqa: E402
from amrseg.cam.io import save_cam  # noqa: E402
from amrseg.cam.reference import release_cams  # noqa: E402
from amrseg.config import load_preset, merge  # noqa: E402
from amrseg.runtime import autocast  # noqa: E402
from amrseg.eval.eval_cam import evaluate_cams  # noqa: E402
from amrseg.models.amr import AMRNet  # noqa: E402
from amrseg.models.losses import amr_loss  # noqa: E402

K = 10
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = _CLOCKS["wall"]


def now() -> float:
    """Seconds on the clock chosen by --clock."""
    return _clock()


def small_cfg(preset: str, width: int):
    cfg = load_preset(preset)
    return merge(cfg, {"model": {"backbone": "resnet18", "base_width": width, "pretrained": "none",
                                 "init_spotlight": None}})


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = now()
    for _ in range(repeat):
        fn()
    return (now() - t0) / repeat


def train_throughput(preset, width, size, batch, device, amp=False, steps=5) -> float:
    cfg = small_cfg(preset, width)
    model = AMRNet(cfg.model, cfg.amm, K).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, K, device=device) < 0.2).float()
    y[:, 0] = 1
    if amp:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.param_groups(0.01, 10, 1e-4), lr=0.01, momentum=0.9)
    dtype = torch.bfloat16 if amp else None

    def step():
        with autocast(torch.device(device), dtype):
            out = model(x)
        loss = amr_loss({k: v.float() for k, v in out.items()}, y, cfg.loss)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return batch / timeit(step, steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=32, help="images of the make-cam rows (default 32)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--width", type=int, default=32, help="ResNet-18 base width (default 32)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)} (default all)")
    p.add_argument("--clock", default="wall", choices=list(_CLOCKS),
                   help="wall: elapsed time; cpu: this process's CPU time, which other load on the machine "
                        "barely moves (with OMP_NUM_THREADS=1 it reads as single-core time) (default wall)")
    p.add_argument("--out", default="bench/out/speed.md", help="markdown table to write (default bench/out/speed.md)")
    a = p.parse_args()
    global _clock
    _clock = _CLOCKS[a.clock]
    parts = a.parts.split(",")
    if any(x not in PARTS for x in parts):
        p.error(f"--parts {a.parts}: expected names from {', '.join(PARTS)}")
    torch.manual_seed(0)
    rows = []

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices if "train" in parts else []:
        for preset in ("cam", "amr", "amr-block", "amr-gtm", "amr-official"):
            ips = train_throughput(preset, a.width, a.size, 16, device)
            rows.append(("train-cam step", f"{preset}, {device} fp32, resnet18 w{a.width}, {a.size}px, batch 16",
                         f"{ips:.1f} img/s", ""))
            if device == "cuda":
                ips2 = train_throughput(preset, a.width, a.size, 16, device, amp=True)
                rows.append(("train-cam step", f"{preset}, cuda bf16 + channels_last", f"{ips2:.1f} img/s",
                             f"{ips2 / ips:.2f}x vs fp32"))

    # make-cam: batched vs the slow reading of the release, same maps. Seeded here, so the model and
    # images do not depend on which presets the throughput part above ran.
    torch.manual_seed(0)
    cfg = small_cfg("amr", a.width)
    model = AMRNet(cfg.model, cfg.amm, K).eval()
    images = smooth_images(a.images, a.size)
    keys = [torch.tensor(sorted(np.random.default_rng(i).choice(K, 1 + i % 3, replace=False).tolist()))
            for i in range(a.images)]
    scales = [1.0, 0.5, 1.5, 2.0]
    for method in ("cam", "gradcam") if "make-cam" in parts else ():
        icfg = InferConfig(method=method, scales=scales, batch_size=16)
        t0 = now()
        batched = []
        for s in range(0, a.images, icfg.batch_size):
            batched += cams_for_images(model, images[s:s + icfg.batch_size], [k.clone() for k in keys[s:s + 16]], icfg)
        t_batched = now() - t0
        t0 = now()
        ref = [release_cams(model, images[i], keys[i].tolist(), scales, 0.5, method) for i in range(a.images)]
        t_ref = now() - t0
        err = max(map_diff(b[1], r) for b, r in zip(batched, ref))
        rows.append((f"make-cam {method}", f"{a.images} images {a.size}px, scales {scales} + flip, amr",
                     f"{a.images / t_batched:.1f} img/s batched vs {a.images / t_ref:.1f} img/s release loop",
                     f"{t_ref / t_batched:.1f}x, max diff {err:.1e}"))

    if "advcam" in parts:
        # advcam: all classes of an image in one batch vs one class at a time
        icfg = InferConfig(method="advcam", adv_steps=8)
        multi = [i for i in range(a.images) if len(keys[i]) > 1][:6]
        t_b, t_l, err32 = advcam_batched_vs_per_class(model, images, keys, multi, icfg)
        # The climb's hard decisions (the R_t mask, the count of positive gradient entries) can turn
        # float32 noise between batch sizes into visible differences; in float64 they agree to rounding.
        _, _, err64 = advcam_batched_vs_per_class(model.double(), images, keys, multi, icfg)
        rows.append(("make-cam advcam", f"{len(multi)} images with 2-3 classes, {icfg.adv_steps} steps, scale 1",
                     f"{len(multi) / t_b:.2f} img/s batched vs {len(multi) / t_l:.2f} img/s per class",
                     f"{t_l / t_b:.1f}x, max diff {err32:.1e} (float64: {err64:.1e})"))
        # the whole of make-cam advcam against the release's reading, in float64 (see above): one image,
        # two scales (the release loop is slow)
        icfg = InferConfig(method="advcam", scales=[1.0, 0.5], adv_steps=8)
        few = multi[:1]
        t0 = now()
        ours = [cams_for_images(model, [images[i]], [keys[i].clone()], icfg)[0] for i in few]
        t_ours = now() - t0
        t0 = now()
        ref = [release_cams(model, images[i], keys[i].tolist(), icfg.scales, 0.5, "advcam", steps=icfg.adv_steps)
               for i in few]
        t_ref = now() - t0
        err = max(map_diff(o[1], r) for o, r in zip(ours, ref))
        rows.append(("make-cam advcam", f"{len(few)} image, scales {icfg.scales} + flip, {icfg.adv_steps} steps, "
                     "amr, float64", f"{len(few) / t_ours:.2f} img/s vs {len(few) / t_ref:.2f} img/s release loop",
                     f"{t_ref / t_ours:.1f}x, max diff {err:.1e}"))
        model.float()

    # eval-cam: one-pass sweep vs separate passes
    if "eval-cam" in parts:
        rows.append(eval_cam_row(a.size))

    lines = [f"Speed, measured {time.strftime('%Y-%m-%d')} on {_machine()}, {a.clock} clock, "
             f"{torch.get_num_threads()} torch threads", "",
             "| what | setting | figure | vs baseline |", "|---|---|---|---|"]
    lines += [f"| {a_} | {b} | {c} | {d} |" for a_, b, c, d in rows]
    text = "\n".join(lines)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")


PARTS = ("train", "make-cam", "advcam", "eval-cam")


def eval_cam_row(size: int) -> tuple:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _fake_data(root, rng, n=200, size=size)
        thresholds = [round(0.05 * i, 2) for i in range(1, 20)]
        t0 = now()
        sweep = evaluate_cams(root / "cams", data, thresholds)
        t_sweep = now() - t0
        t0 = now()
        single = [evaluate_cams(root / "cams", data, [t])["miou"] for t in thresholds]
        t_single = now() - t0
        agree = max(abs(m - s) for (_, m), s in zip(sweep["sweep"], single))
    return ("eval-cam", f"200 images {size}px, 19 thresholds",
            f"{t_sweep:.2f} s one pass vs {t_single:.2f} s in 19 passes",
            f"{t_single / t_sweep:.1f}x, max mIoU diff {agree:.1e}")


def smooth_images(n: int, size: int) -> list[np.ndarray]:
    """n uint8 RGB images size x size: noise on an 8 x 8 grid, upsampled (maps with structure)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).resize((size, size),
                                                                                                Image.BILINEAR))
            for _ in range(n)]


def map_diff(maps: dict, ref: dict) -> float:
    """Max |difference| of make-cam's maps against the release's reading: branches, and the fused map
    renormalised to peak 1 (amrseg's), at image resolution and at stride 4."""
    err = 0.0
    for res, prefix, fused in (("hi", "", "fused"), ("lo", "cam_", "cam")):
        for name, r in ref[res].items():
            got = maps[fused] if name == "fused" else maps[prefix + name]
            r = unit_peak(r) if name == "fused" else r
            err = max(err, (got.double() - r.double()).abs().max().item())
    return err


def advcam_batched_vs_per_class(model, images, keys, index, icfg) -> tuple[float, float, float]:
    """(seconds batched, seconds per class, max |difference| of the maps) of the advcam climb at scale 1."""
    dtype = next(model.parameters()).dtype
    pairs = {}
    for i in index:
        x = scale_pyramid(images[i], [1.0])[0].to(dtype)
        pairs[i] = torch.stack([x, x.flip(-1)])[None]
    t0 = now()
    batched = [advcam_maps(model, pairs[i].expand(len(keys[i]), -1, -1, -1, -1), keys[i], icfg.adv_steps, icfg)
               for i in index]
    t_b = now() - t0
    t0 = now()
    err = 0.0
    for i, bm in zip(index, batched):
        for j, c in enumerate(keys[i].tolist()):
            one = advcam_maps(model, pairs[i], torch.tensor([c]), icfg.adv_steps, icfg)
            for name in one:
                err = max(err, (one[name][0] - bm[name][j]).abs().max().item())
    return t_b, now() - t0, err


class _FakeData:
    """The attributes of SegData that evaluate_cams reads."""

    def __init__(self, ids, masks, class_names):
        self.ids, self._masks, self.class_names = ids, masks, class_names
        self.labels = None

    @property
    def num_classes(self):
        return len(self.class_names) - 1

    def __len__(self):
        return len(self.ids)

    def load_mask(self, i):
        return self._masks[i]


def _fake_data(root: Path, rng, n: int, size: int) -> _FakeData:
    ids, masks = [], []
    (root / "cams").mkdir(parents=True)
    for i in range(n):
        keys = np.sort(rng.choice(K, 2, replace=False)).astype(np.int64)
        maps = rng.random((2, size, size)).astype(np.float32)
        mask = np.where(maps.max(0) > 0.5, keys[maps.argmax(0)] + 1, 0).astype(np.uint8)
        mask[rng.random((size, size)) < 0.1] = rng.integers(0, K + 1)
        ids.append(f"img{i:04d}")
        masks.append(mask)
        save_cam(root / "cams" / f"{ids[-1]}.npz", keys=keys, high_res=maps)
    return _FakeData(ids, masks, ["background"] + [f"c{k}" for k in range(K)])


def _machine() -> str:
    import os
    import platform

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}{gpu}"


if __name__ == "__main__":
    main()
