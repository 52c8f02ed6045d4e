"""The run-kind registry's contract (runs.RUN_KINDS), checked over every entry, and load_run."""
import dataclasses

import pytest
import torch
import yaml

from amrseg.config import merge, to_dict
from amrseg.data.voc import open_dataset
from amrseg.errors import AmrsegError
from amrseg.runs import RUN_KINDS, load_run

SMALL = {"model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"},
         "data": {"crop": 32}, "train": {"batch_size": 2, "num_workers": 0}}


def _config(kind, root):
    entry = RUN_KINDS[kind]
    extra = {"cam": {}, "irn": {"ir_labels": str(root / "SegmentationClass"), "cams": str(root),
                                "model": {"radius": 3}},
             "seg": {"labels": str(root / "SegmentationClass")}}[kind]
    cfg = merge(entry.config(), {**SMALL, "data_root": str(root), "split": "train"})
    cfg = merge(cfg, extra)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_run_kind_contract(kind, tiny_voc):
    entry = RUN_KINDS[kind]
    assert entry.name == kind and entry.config().kind == kind and entry.command == f"train-{kind}"
    cfg = _config(kind, tiny_voc)
    data = open_dataset(tiny_voc, "train", require_labels=entry.needs_image_labels)
    dataset = entry.dataset(cfg, data)
    dataset.set_epoch(0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    assert batch[0].shape[-2:] == (32, 32)  # the image batch comes first
    torch.manual_seed(0)
    net = entry.build(cfg, data.num_classes, False).train()
    # The parameter groups hold every trainable parameter exactly once, each with its lr.
    groups = net.param_groups(0.1, 10.0, 1e-4)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all(g["lr"] == g["initial_lr"] > 0 for g in groups)
    # The losses: a finite total with a gradient, and every logged name present.
    losses = entry.losses(cfg)(net, batch)
    assert torch.isfinite(losses["total"]) and losses["total"].requires_grad
    assert set(entry.log_keys) <= set(losses)
    losses["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_load_run_round_trips_every_kind(kind, tiny_voc, tmp_path):
    entry = RUN_KINDS[kind]
    cfg = _config(kind, tiny_voc)
    data = open_dataset(tiny_voc, "train", require_labels=False)
    torch.manual_seed(1)
    net = entry.build(cfg, data.num_classes, False)
    run = tmp_path / kind
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    torch.save({"state_dict": net.state_dict(), "config": to_dict(cfg), "class_names": list(data.class_names)},
               run / "model.pt")
    loaded = load_run(run, kind)
    assert not loaded.model.training and loaded.class_names == list(data.class_names)
    assert dataclasses.asdict(loaded.config) == to_dict(cfg)
    own = net.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.model.state_dict().items())
    for other in RUN_KINDS:
        if other != kind:
            with pytest.raises(AmrsegError, match=rf"^--run {run}: a train-{kind} run, expected a train-{other} run$"):
                load_run(run, other)


def test_load_run_errors_are_one_line(tmp_path):
    with pytest.raises(AmrsegError, match=r"not a directory \(expected a train-cam run\)$"):
        load_run(tmp_path / "nothing", "cam")
    (tmp_path / "r").mkdir()
    with pytest.raises(AmrsegError, match=r"not a train-seg run directory \(no config.yaml, no model.pt\)$"):
        load_run(tmp_path / "r", "seg", flag="--run")
    (tmp_path / "r" / "config.yaml").write_text("kind: seg\n")
    with pytest.raises(AmrsegError, match=r"model.pt: trained model not found|is the run finished"):
        load_run(tmp_path / "r", "seg")
    with pytest.raises(ValueError, match="unknown run kind"):
        load_run(tmp_path / "r", "nosuch")
