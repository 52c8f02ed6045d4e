"""The optimiser parameter groups every network builds for the training loop (engine.trainer.fit)."""
from __future__ import annotations

from typing import Iterable

import torch


def sgd_groups(groups: Iterable[tuple[str, Iterable[torch.nn.Parameter], float]], weight_decay: float) -> list[dict]:
    """SGD parameter groups from (name, parameters, learning rate) triples, in that order.

    Each group carries its rate twice: `lr` for SGD and `initial_lr`, the rate the poly schedule
    decays from (fit sets lr = initial_lr * scale before every step); `name` labels it.
    """
    return [{"params": list(params), "lr": lr, "initial_lr": lr, "weight_decay": weight_decay, "name": name}
            for name, params, lr in groups]
