"""The training progress bar of both bundle families."""
from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.engine import Engine

__all__ = ["TrainProgressBar", "loss_of"]


def loss_of(output) -> dict[str, float]:
    """``{"loss": float}`` from a trainer's output: a dict (``decollate=False``, the pretraining bundles) or a list of
    per-sample dicts (decollated, the finetuning bundles; every item carries the batch loss)."""
    first = output[0] if isinstance(output, (list, tuple)) else output
    loss = first["loss"]
    return {"loss": float(loss.detach() if isinstance(loss, torch.Tensor) else loss)}  # detach: no grad warning


class TrainProgressBar:
    """ignite's tqdm ``ProgressBar`` as a handler with ``attach(engine)``, so that it sits in ``train#handlers``.

    Shows the iteration within the epoch and the values of ``output_transform`` (default: the loss).

    Args:
        output_transform: ``engine.state.output -> dict`` of the values to show, or ``None`` for none.
        persist: keep the finished bar of each epoch on screen.
    """

    def __init__(self, output_transform: Callable | None = loss_of, persist: bool = False) -> None:
        self.output_transform = output_transform
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        try:
            from ignite.handlers import ProgressBar
        except ImportError:  # ignite < 0.5
            from ignite.contrib.handlers import ProgressBar

        ProgressBar(persist=self.persist).attach(engine, output_transform=self.output_transform)
