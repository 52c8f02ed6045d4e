"""The one per-image loop of the stages that write or score one thing per image.

make-cam, pseudo-labels, visualize, predict and eval-seg --run share it. It
- lists the images whose output file is missing (a re-run finishes an interrupted one; the
  stage's folder claim has already refused outputs of other settings);
- under torchrun, takes the first process's list in every process and gives each its share;
- shows a progress bar;
- scores each image's mask against the ground truth, when asked, through one `Scorer`; the
  images skipped as finished are scored from their files;
- checks at the end that every output was written, in one line naming the first one missing.
The stage supplies `work(indices)`: it makes and writes the outputs of those images (atomically)
and yields (index, mask or None) as each image is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from ..data.voc import IGNORE, SegData
from ..errors import AmrsegError
from ..eval.eval_cam import nan_to_none
from ..eval.metrics import confusion_matrix, iou_from_confusion
from ..runtime import DistInfo, progress


class Scorer:
    """Accumulates one figure over the images' masks; `add` gets (prediction, ground truth)."""

    def add(self, pred: np.ndarray, gt: np.ndarray, where: str) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError


def _check_shapes(pred: np.ndarray, gt: np.ndarray, where: str) -> None:
    if pred.shape != gt.shape:
        raise AmrsegError(f"{where}: size {pred.shape[1]}x{pred.shape[0]} (WxH) differs from the mask's "
                          f"{gt.shape[1]}x{gt.shape[0]}")


@dataclass
class MaskIoU(Scorer):
    """mIoU of the masks (AMR.md section 6): one confusion matrix over all scored images."""

    class_names: list
    conf: torch.Tensor = None
    scored: int = 0

    def __post_init__(self):
        n = len(self.class_names)
        self.conf = torch.zeros(n, n, dtype=torch.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray, where: str) -> None:
        _check_shapes(pred, gt, where)
        n = len(self.class_names)
        top = int(pred[pred != IGNORE].max(initial=0))
        if top >= n:
            raise AmrsegError(f"{where}: class {top}, the dataset has {n} (background included)")
        self.conf += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), n)
        self.scored += 1

    def result(self) -> dict:
        if not self.scored:
            return {"miou": None, "iou": {}, "scored_images": 0}
        iou, miou = iou_from_confusion(self.conf)  # NaN: a class absent from both, reported as None
        return {"miou": nan_to_none(miou.item()),
                "iou": {c: nan_to_none(v) for c, v in zip(self.class_names, iou.tolist())},
                "scored_images": self.scored}


@dataclass
class LabelAgreement(Scorer):
    """IR labels: the share of pixels they are confident about (not 255), and how many of those
    that have a ground truth agree with it."""

    totals: np.ndarray = field(default_factory=lambda: np.zeros(4, np.int64))
    scored: int = 0

    def add(self, pred: np.ndarray, gt: np.ndarray, where: str) -> None:
        _check_shapes(pred, gt, where)
        confident = pred != IGNORE
        known = confident & (gt != IGNORE)
        self.totals += np.array([(known & (pred == gt)).sum(), known.sum(), confident.sum(), pred.size], np.int64)
        self.scored += 1

    def result(self) -> dict:
        t = self.totals
        return {"scored_images": self.scored,
                "confident_precision": float(t[0] / t[1]) if t[1] else None,
                "confident_fraction": float(t[2] / t[3]) if t[3] else None}


def on_first(job: Callable[[], None], dist_info: DistInfo) -> None:
    """Runs `job` (claiming the output folder) in the first process only; every process waits for it
    and raises its AmrsegError (without torchrun: just `job()`)."""
    error = None
    if dist_info.is_main:
        try:
            job()
        except AmrsegError as e:
            error = str(e)
    error = agreed(error, dist_info)
    if error is not None:
        raise AmrsegError(error)


def agreed(work: Optional[list], dist_info: DistInfo) -> list:
    """`work` of the first process, the same list in every process (a no-op without torchrun)."""
    if not dist_info.enabled:
        return work
    box = [work]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class ImageLoop:
    """One pass of a stage over the images of a split.

    Attributes:
        data: the split.
        output: path of image i's output file, or None when the stage writes nothing per image.
        desc: the progress bar's label (the command).
        scorer: scores each image's mask against its ground truth (None: no score).
        reread: the mask of an image skipped as finished, for the scorer (e.g. its PNG).
        what: the outputs' name in the message that some were not written.
        indices: the images to visit (default: all of the split).
        dist: the processes of a torchrun launch (default: this process alone).
    """

    data: SegData
    output: Optional[Callable[[int], Path]] = None
    desc: str = ""
    scorer: Optional[Scorer] = None
    reread: Optional[Callable[[int], np.ndarray]] = None
    indices: Optional[list] = None
    dist: DistInfo = field(default_factory=DistInfo)
    what: str = "outputs"  # what the outputs are, for the message when some are missing ("CAM files")

    def run(self, work: Callable[[list], Iterable[tuple]], show_progress: Optional[bool] = None) -> dict:
        """Runs `work` over the pending images; returns {"written", "skipped"} and the score."""
        indices = list(range(len(self.data))) if self.indices is None else list(self.indices)
        if self.output is None:
            pending = indices
        else:
            pending = agreed([i for i in indices if not self.output(i).exists()] if self.dist.is_main else None,
                             self.dist)
        todo = set(pending)
        finished = [i for i in indices if i not in todo]
        mine = pending[self.dist.rank::self.dist.world_size]
        scored = self.scorer is not None and self.dist.is_main
        total = len(mine) + (len(finished) if scored else 0)
        with progress(total=total, enabled=show_progress if self.dist.is_main else False, desc=self.desc,
                      unit="img") as bar:
            if scored and self.reread is not None:
                for i in finished:
                    self._score(i, self.reread(i))
                    bar.update(1)
            for i, mask in _checked(work(mine)):
                if scored and mask is not None:
                    self._score(i, mask)
                bar.update(1)
        if self.dist.enabled:
            torch.distributed.barrier()  # every process has written its share
        if self.output is not None:
            missing = [i for i in pending if not self.output(i).exists()]
            if missing:
                raise AmrsegError(f"--out {self.output(missing[0]).parent}: {len(missing)} of the {len(pending)} "
                                  f"{self.what} were not written (first: {self.output(missing[0]).name}); run the "
                                  f"same command again to finish them")
        summary = {"written": len(pending), "skipped": len(finished)}
        if self.scorer is not None:
            summary.update(self.scorer.result())
        return summary

    def _score(self, i: int, pred: np.ndarray) -> None:
        gt = self.data.load_mask(i)
        if gt is not None:
            where = str(self.output(i)) if self.output is not None else self.data.ids[i]
            self.scorer.add(np.asarray(pred), gt, where)


def _checked(items: Iterable[tuple]) -> Iterator[tuple]:
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError("an ImageLoop work function yields (index, mask or None)")
        yield item


def score_masks(data: SegData, pred_of: Callable[[int], np.ndarray], show_progress: Optional[bool] = None,
                desc: str = "eval-seg") -> dict:
    """mIoU of the masks pred_of(i) over the images of `data` that have a ground truth:
    {"miou", "iou": {class: IoU}, "num_images"}."""
    scored = [i for i in range(len(data)) if data.mask_paths[i] is not None]
    if not scored:
        raise AmrsegError(f"--split {data.split}: no image of the split has a ground-truth mask to score against")
    scorer = MaskIoU(list(data.class_names))
    ImageLoop(data, desc=desc, scorer=scorer, indices=scored).run(lambda shard: ((i, pred_of(i)) for i in shard),
                                                                  show_progress)
    figures = scorer.result()
    return {"miou": figures["miou"], "iou": figures["iou"], "num_images": figures["scored_images"]}
