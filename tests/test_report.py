"""report.html / report.json of `amrseg run`, on a small hand-made experiment folder."""
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import amrseg
from amrseg.data.voc import VOC_PALETTE, write_palette_png
from amrseg.report import read_log, write_report

VOID = {"meta", "img", "br", "hr", "link", "input"}


class StrictParser(HTMLParser):
    """Collects links, table rows and text; records every end tag that does not close the open one."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.refs, self.tags = [], [], [], []
        self.rows, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href")]
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text):
    p = StrictParser()
    p.feed(text)
    p.close()
    assert p.errors == [] and p.stack == [], (p.errors, p.stack)
    return p


LOG = """step,epoch,loss,cls,lr,images_per_s
1,0.5,2.0,1.5,0.1,10.0
2,1.0,1.0,,0.05,11.0
2,1.0,1.2,0.9,0.05,11.0
3,1.5,0.5,0.4,0.01,12.0
"""


def make_experiment(root: Path, panels=3):
    exp, data = root / "exp", root / "data"
    (exp / "cam").mkdir(parents=True)
    (exp / "cam" / "log.csv").write_text(LOG)
    gallery = exp / "gallery"
    (gallery / "panels").mkdir(parents=True)
    for k in range(panels):
        Image.new("RGB", (20, 10), (k * 40, 0, 0)).save(gallery / "panels" / f"img{k}.png")
    (gallery / "index.html").write_text("<html></html>")
    (data / "JPEGImages").mkdir(parents=True)
    masks = {}
    for k, iid in enumerate(["a_1", "b_2", "c_3"]):
        mask = np.zeros((32, 40), np.uint8)
        mask[4:20, 6:30] = k + 1
        mask[0, :] = 255
        write_palette_png(exp / "ir" / f"{iid}.png", mask)
        masks[iid] = mask
        if iid != "c_3":  # c_3 has no image: its strip is the mask alone
            Image.fromarray(np.full((32, 40, 3), 200, np.uint8)).save(data / "JPEGImages" / f"{iid}.jpg", quality=95)
    record = {
        "experiment": "demo", "file": str(root / "demo.yaml"), "out": str(exp),
        "stages": [
            {"name": "train-cam", "command": "train-cam", "status": "done", "seconds": 212.3,
             "config": {"preset": "amr-block", "data": {"root": str(data), "split": "train"},
                        "note": "<script>alert(1)</script>"},
             "summary": {"finished": True, "step": 3, "total_steps": 3}, "outputs": {"run": "cam"}},
            {"name": "eval-cam", "command": "eval-cam", "status": "skipped (finished)", "seconds": None,
             "config": {"data": str(data), "split": "val"},
             "summary": {"miou": 0.3021, "threshold": 0.2, "iou": {"background": 0.7, "a&b": 0.1},
                         "sweep": [[0.1, 0.25], [0.2, 0.3021], [0.3, 0.28]], "num_images": 300},
             "outputs": {}},
            {"name": "visualize", "command": "visualize", "status": "done", "seconds": 3.0,
             "config": {}, "summary": {}, "outputs": {"gallery": "gallery"}},
            {"name": "ir-labels", "command": "pseudo-labels", "status": "done", "seconds": 95.04,
             "config": {"data_root": str(data), "split": "train", "method": "crf"},
             "summary": {"written": 3, "confident_fraction": 0.8043, "confident_precision": 0.9231},
             "outputs": {"labels": "ir"}},
            {"name": "pseudo-masks", "command": "pseudo-labels", "status": "not run", "seconds": None,
             "config": {"data": str(data)}, "summary": {}, "outputs": {"labels": "missing-folder"}},
        ],
        "runs": {"train-cam": "cam", "train-irn": "irn-never-ran"},
    }
    return exp, record, masks


def cells(parser, first):
    rows = [r for r in parser.rows if r and r[0] == first]
    assert len(rows) == 1, rows
    return rows[0]


def test_report_json_round_trips_the_record_with_provenance(tmp_path):
    exp, record, _ = make_experiment(tmp_path)
    html_path, json_path = write_report(exp, record)
    assert (html_path, json_path) == (exp / "report.html", exp / "report.json")
    report = json.loads(json_path.read_text())
    prov = report.pop("provenance")
    assert report == record
    assert set(prov) >= {"git", "versions", "machine", "created"}
    assert prov["versions"]["amrseg"] == amrseg.__version__
    assert prov["versions"]["numpy"] == np.__version__
    assert prov["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(prov["machine"]) >= {"platform", "processor", "cpus", "gpu"}
    root = Path(amrseg.__file__).resolve().parent.parent
    expected = None
    if (root / ".git").exists():
        expected = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert prov["git"] == expected


def test_report_html_figures_escaping_and_links(tmp_path):
    exp, record, _ = make_experiment(tmp_path)
    text = write_report(exp, record, limit=2)[0].read_text()
    p = parse(text)
    header = cells(p, "stage")
    col = {name: header.index(name) for name in ("mIoU (%)", "threshold", "confident (%)", "precision (%)", "time (s)")}
    ev, ir, tc = cells(p, "eval-cam"), cells(p, "ir-labels"), cells(p, "train-cam")
    assert (ev[col["mIoU (%)"]], ev[col["threshold"]], ev[col["time (s)"]]) == ("30.2", "0.20", "-")
    assert (ir[col["confident (%)"]], ir[col["precision (%)"]], ir[col["time (s)"]]) == ("80.4", "92.3", "95.0")
    assert tc[col["mIoU (%)"]] == "-" and "step 3/3" in tc
    assert cells(p, "total")[-1] == f"{212.3 + 3.0 + 95.04:.1f}"
    assert cells(p, "a&b") == ["a&b", "10.0"]  # per-class IoU, escaped in the source
    assert "a&amp;b" in text
    # The config string is text, not markup.
    assert "<script" not in text and "script" not in p.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # Every link is a local file that exists; no network addresses.
    assert p.refs
    for ref in p.refs:
        assert "://" not in ref and not ref.startswith("//"), ref
        assert (exp / ref).is_file(), ref
    # Galleries: the first `limit` panels of the visualize folder and a link to its index.html.
    panels = [r for r in p.refs if r.startswith("gallery/panels/")]
    assert panels == ["gallery/panels/img0.png", "gallery/panels/img1.png"]
    assert "gallery/index.html" in p.refs
    assert "irn-never-ran" in text and "no log.csv" in text  # a run without a log is named, not drawn
    assert not [f for f in exp.rglob("*") if f.name.endswith(".tmp")]


def test_curves_are_png_files(tmp_path):
    exp, record, _ = make_experiment(tmp_path)
    p = parse(write_report(exp, record)[0].read_text())
    pngs = [r for r in p.refs if r.startswith("report_files/") and ("curves-" in r or "sweep-" in r)]
    assert len(pngs) == 2  # one training run with a log, one sweep
    for ref in pngs:
        with Image.open(exp / ref) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
            # Not a blank canvas: the curve and axes draw dark pixels.
            assert np.asarray(img.convert("L")).min() < 100


def test_read_log_last_row_of_a_step_wins_and_skips_empty_cells(tmp_path):
    (tmp_path / "log.csv").write_text(LOG)
    series = read_log(tmp_path / "log.csv")
    assert series["loss"] == [(1, 2.0), (2, 1.2), (3, 0.5)]
    assert series["cls"] == [(1, 1.5), (2, 0.9), (3, 0.4)]
    assert series["lr"] == [(1, 0.1), (2, 0.05), (3, 0.01)]
    assert "epoch" not in series and "step" not in series
    assert read_log(tmp_path / "absent.csv") == {}


def test_mask_strips_show_image_mask_and_overlay(tmp_path):
    exp, record, masks = make_experiment(tmp_path)
    p = parse(write_report(exp, record)[0].read_text())
    strips = sorted(r for r in p.refs if r.startswith("report_files/masks-"))
    assert len(strips) == 3
    for ref, (iid, mask) in zip(strips, sorted(masks.items())):
        assert iid in ref
        strip = np.asarray(Image.open(exp / ref).convert("RGB"))
        has_image = iid != "c_3"
        assert strip.shape == (32, 40 * 3 + 8 if has_image else 40, 3)
        x0 = 44 if has_image else 0  # the mask tile: after the image and a 4 px gap
        assert np.array_equal(strip[:, x0:x0 + 40], VOC_PALETTE[mask])
        if has_image:  # the overlay: half the grey image, half the mask colour
            expected = np.round(0.5 * 200 + 0.5 * VOC_PALETTE[mask].astype(float))
            assert np.abs(strip[:, 88:128].astype(float) - expected).max() <= 1
            assert np.all(strip[:, :40] >= 190)  # the JPEG's grey


def test_page_renders_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    exp, record, _ = make_experiment(tmp_path)
    text = write_report(exp, record)[0].read_text()
    p = parse(text)
    assert text.count("matplotlib is not installed") == 1
    assert not [r for r in p.refs if "curves-" in r or "sweep-" in r]
    assert cells(p, "eval-cam")[3] == "30.2"
    assert not (exp / "report_files").exists() or not list((exp / "report_files").glob("curves-*"))


def test_missing_and_odd_inputs_never_raise(tmp_path):
    exp = tmp_path / "exp"
    record = {"experiment": "x<y", "stages": [
        {"name": "eval-seg", "summary": {"miou": float("nan"), "iou": {"a": None}},
         "outputs": {"gallery": "nowhere", "pred": "also-nowhere", "cams": 3}, "config": None},
        "not a stage"], "runs": {"train-seg": None}}
    html_path, json_path = write_report(exp, record)
    report = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["stages"][0]["summary"]["miou"] is None  # NaN is written as null
    p = parse(html_path.read_text())
    assert cells(p, "eval-seg")[3] == "-"
    assert "amrseg report: x&lt;y" in html_path.read_text()
