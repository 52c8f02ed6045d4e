"""The open emoji art behind emoji-VOC: fetching it (`amrseg fetch-art`) and reading it.

Two sets of 64 px RGBA PNGs, Twemoji (CC-BY 4.0) and Google's Noto emoji (Apache 2.0), as the npm
packages emoji-datasource-twitter and emoji-datasource-google ship them. An art folder holds

    DIR/emoji.json                   the emoji-datasource index (the same file in both packages)
    DIR/img/<vendor>/64/<image>      one PNG per emoji and skin variation

and nothing else. `fetch_art` gets the packages with the ordinary npm client (`npm pack`), unpacks
only those files, and moves each vendor folder into place with a rename and emoji.json last, so an
interrupted fetch never leaves a folder that `check_art` accepts.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from ..errors import AmrsegError

VENDORS = ("twitter", "google")
ART_VERSION = "16.0.0"
PACKAGES = {v: f"emoji-datasource-{v}" for v in VENDORS}
DEFAULT_ART_DIR = Path("~/.cache/amrseg/emoji-art")
IMAGE_SIZE = 64
_IMAGE_NAME = re.compile(r"^[0-9a-f][0-9a-f-]*\.png$")  # emoji-datasource names: 1f436.png, 1f415-200d-1f9ba.png
_MAX_MEMBER_BYTES = 16 << 20  # emoji.json is 1.3 MB, an image a few kB: anything larger is not theirs

FETCH_HINT = "run 'amrseg fetch-art'"


def art_dir(path: Union[str, Path, None] = None) -> Path:
    """The art folder: `path`, else $AMRSEG_ART, else ~/.cache/amrseg/emoji-art."""
    return Path(path or os.environ.get("AMRSEG_ART") or DEFAULT_ART_DIR).expanduser()


def tarball_url(vendor: str) -> str:
    name = PACKAGES[vendor]
    return f"https://registry.npmjs.org/{name}/-/{name}-{ART_VERSION}.tgz"


# --------------------------------------------------------------------------- the index


@dataclass(eq=False)
class Emoji:
    """One emoji of emoji.json.

    Attributes:
        short_name: its first short name (the class name in pretraining).
        short_names: all its short names (classes.json may use any of them).
        category, subcategory: emoji-datasource's grouping ("Animals & Nature", "animal-mammal").
        images: {vendor: (base image, skin variations' images...)}, file names under
            img/<vendor>/64/, for the vendors that draw it (has_img_<vendor>).
    """
    short_name: str
    short_names: tuple
    category: str
    subcategory: str
    images: dict
    sort_order: int = 0

    @property
    def vendors(self) -> tuple:
        return tuple(self.images)


def parse_index(path: Union[str, Path], vendors: Sequence[str] = VENDORS) -> list:
    """Reads emoji.json into `Emoji` records (sorted by sort_order), keeping those drawn by a vendor.

    Raises:
        AmrsegError: unreadable, not the emoji-datasource format, or image names that are not plain
            file names.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise AmrsegError(f"{path}: cannot read the emoji index ({why}); {FETCH_HINT}") from None
    if not isinstance(raw, list) or not raw:
        raise AmrsegError(f"{path}: not an emoji-datasource index (expected a non-empty list); {FETCH_HINT}")
    out = []
    try:
        for e in raw:
            skins = e.get("skin_variations") or {}
            images = {}
            for v in vendors:
                if e.get(f"has_img_{v}"):
                    images[v] = (e["image"], *(skins[k]["image"] for k in sorted(skins)
                                               if skins[k].get(f"has_img_{v}", True)))
            if not images:
                continue
            for name in {n for names in images.values() for n in names}:
                if not isinstance(name, str) or not _IMAGE_NAME.match(name):
                    raise AmrsegError(f"{path}: bad image name {name!r}")
            out.append(Emoji(short_name=str(e["short_name"]), short_names=tuple(str(s) for s in e["short_names"]),
                             category=str(e["category"]), subcategory=str(e["subcategory"]), images=images,
                             sort_order=int(e.get("sort_order", 0))))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise AmrsegError(f"{path}: not an emoji-datasource index ({type(e).__name__}: {e}); {FETCH_HINT}") from None
    out.sort(key=lambda em: (em.sort_order, em.short_name))
    return out


def _missing_images(root: Path, vendor: str, index: Iterable[Emoji]) -> list:
    folder = root / "img" / vendor / str(IMAGE_SIZE)
    if not folder.is_dir():
        return [str(folder)]
    present = set(os.listdir(folder))
    return [str(folder / name) for e in index for name in e.images.get(vendor, ()) if name not in present]


def check_art(path: Union[str, Path, None] = None, vendors: Sequence[str] = VENDORS) -> tuple:
    """Checks that an art folder is complete; returns (folder, index).

    Complete: emoji.json parses and every vendor's folder holds every image that emoji.json says
    the vendor draws (has_img_<vendor>, skin variations included).

    Raises:
        AmrsegError: one line naming the folder and saying to run `amrseg fetch-art`.
    """
    root = art_dir(path)
    if not (root / "emoji.json").is_file():
        raise AmrsegError(f"{root}: no emoji art here (no emoji.json); run 'amrseg fetch-art {root}' or pass "
                          "--art DIR")
    index = parse_index(root / "emoji.json", vendors)
    for vendor in vendors:
        missing = _missing_images(root, vendor, index)
        if missing:
            raise AmrsegError(f"{root}: incomplete emoji art ({len(missing)} missing, e.g. {missing[0]}); "
                              f"run 'amrseg fetch-art {root}'")
    return root, index


# --------------------------------------------------------------------------- fetching


def _npm_pack(packages: list, workdir: Path, log: Callable[[str], object]) -> list:
    npm = shutil.which("npm")
    if npm is None:
        urls = " and ".join(tarball_url(v) for v in VENDORS)
        raise AmrsegError(f"npm not found: install Node.js (npm), or download {urls} by hand and run "
                          "'amrseg fetch-art DIR --tarballs FILE FILE'")
    log(f"fetch-art: npm pack {' '.join(packages)}")
    try:
        done = subprocess.run([npm, "pack", "--silent", *packages], cwd=workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AmrsegError(f"npm pack {' '.join(packages)} failed ({type(e).__name__}: {e})") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise AmrsegError(f"npm pack {' '.join(packages)} failed (exit {done.returncode}): "
                          f"{lines[-1] if lines else 'no message'}")
    return sorted(workdir.glob("*.tgz"))


def _vendor_of(tgz: Path) -> Optional[str]:
    for vendor, name in PACKAGES.items():
        if tgz.name.startswith(f"{name}-"):
            return vendor
    return None


def extract_package(tgz: Union[str, Path], vendor: str, dest: Path, log: Callable[[str], object] = print) -> int:
    """Unpacks package/emoji.json and package/img/<vendor>/64/*.png of one npm tarball into `dest`.

    Safe against hostile archives: only regular files whose member name is exactly one of those
    paths (no '..', no links, plain emoji-datasource image names) are written, to paths built here
    from the base name, and none larger than 16 MB.

    Returns:
        the number of images written to dest/img/<vendor>/64/.

    Raises:
        AmrsegError: unreadable tarball, or one without emoji.json or images of `vendor`.
    """
    tgz = Path(tgz)
    prefix = f"package/img/{vendor}/{IMAGE_SIZE}/"
    img_dir = dest / "img" / vendor / str(IMAGE_SIZE)
    img_dir.mkdir(parents=True, exist_ok=True)
    n_images, has_index = 0, False
    try:
        with tarfile.open(tgz, "r:*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name == "package/emoji.json":
                    target = dest / "emoji.json"
                elif name.startswith(prefix) and _IMAGE_NAME.match(name[len(prefix):]):
                    target = img_dir / name[len(prefix):]
                else:
                    continue
                if not member.isreg() or member.size > _MAX_MEMBER_BYTES:
                    raise AmrsegError(f"{tgz}: {member.name} is not a regular file of at most 16 MB")
                src = tar.extractfile(member)
                if src is None:
                    raise AmrsegError(f"{tgz}: cannot read {member.name}")
                with src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
                if target.name == "emoji.json":
                    has_index = True
                else:
                    n_images += 1
    except (OSError, tarfile.TarError, EOFError) as e:
        raise AmrsegError(f"{tgz}: cannot unpack ({str(e) or type(e).__name__})") from None
    if not has_index or n_images == 0:
        raise AmrsegError(f"{tgz}: not the {PACKAGES[vendor]} package (no package/emoji.json or no "
                          f"{prefix}*.png)")
    log(f"fetch-art: {vendor}: {n_images} images")
    return n_images


def fetch_art(path: Union[str, Path, None] = None, tarballs: Optional[Sequence[Union[str, Path]]] = None,
              log: Callable[[str], object] = lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Gets the emoji art into the art folder (see module doc); skips it when already complete.

    Args:
        path: the art folder (default: $AMRSEG_ART, else ~/.cache/amrseg/emoji-art).
        tarballs: the two packages' .tgz files, already downloaded; None runs `npm pack`.
        log: progress messages.

    Returns:
        {"art": folder, "emoji": number of emoji, "images": {vendor: count}, "fetched": [vendors]}.
    """
    root = art_dir(path)
    try:
        index = parse_index(root / "emoji.json") if (root / "emoji.json").is_file() else None
    except AmrsegError:
        index = None
    # With a good index, only the vendors with missing images are fetched again.
    need = [v for v in VENDORS if index is None or _missing_images(root, v, index)]
    if not need:
        log(f"fetch-art: {root} is complete, nothing to do")
    else:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".fetch-*"):  # left by a fetch that was killed outright
            shutil.rmtree(stale, ignore_errors=True)
        # Staging inside the destination: same file system, so the final moves are renames.
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            tmp = Path(tmp)
            if tarballs:
                tgzs = [Path(t) for t in tarballs]
                for t in tgzs:
                    if not t.is_file():
                        raise AmrsegError(f"--tarballs {t}: no such file")
            else:
                (tmp / "npm").mkdir()
                tgzs = _npm_pack([f"{PACKAGES[v]}@{ART_VERSION}" for v in need], tmp / "npm", log)
            by_vendor = {}
            for t in tgzs:
                vendor = _vendor_of(t)
                if vendor is None:
                    names = ", ".join(f"{p}-{ART_VERSION}.tgz" for p in PACKAGES.values())
                    raise AmrsegError(f"{t}: not one of {names}")
                by_vendor[vendor] = t
            absent = [v for v in need if v not in by_vendor]
            if absent:
                raise AmrsegError(f"no {PACKAGES[absent[0]]} tarball (got {', '.join(t.name for t in tgzs) or 'none'})")
            stage = tmp / "stage"
            for vendor in need:
                log(f"fetch-art: unpacking {by_vendor[vendor].name}")
                extract_package(by_vendor[vendor], vendor, stage, log)
            parse_index(stage / "emoji.json")  # a broken index never reaches the folder
            # emoji.json goes first out and last in: until the end the folder does not look complete.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root / "emoji.json")
            for vendor in need:
                final = root / "img" / vendor / str(IMAGE_SIZE)
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    os.replace(final, tmp / f"old-{vendor}")
                os.replace(stage / "img" / vendor / str(IMAGE_SIZE), final)
            os.replace(stage / "emoji.json", root / "emoji.json")
        _, index = check_art(root)
        log(f"fetch-art: {root} complete")
    counts = {v: len(os.listdir(root / "img" / v / str(IMAGE_SIZE))) for v in VENDORS}
    return {"art": str(root), "emoji": len(index), "images": counts, "fetched": need}
