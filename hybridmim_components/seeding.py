"""Reproducible random draws in the bundles' workflows."""
from __future__ import annotations

import torch
from ignite.engine import Engine, Events

__all__ = ["ReseedHandler"]


class ReseedHandler:
    """Reset random states at the start of every run of an engine, so each validation sees the same masks.

    Args:
        seed: the seed.
        transform: a ``Randomizable`` transform (e.g. the validation ``Compose``): ``set_random_state(seed)``
            (covers ``num_workers=0``).
        generator: the DataLoader's ``torch.Generator``: ``manual_seed(seed)`` (covers worker processes, whose seeds
            come from it).
    """

    def __init__(self, seed: int = 0, transform=None, generator: torch.Generator | None = None) -> None:
        self.seed = int(seed)
        self.transform = transform
        self.generator = generator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=self.seed)
        if self.generator is not None:
            self.generator.manual_seed(self.seed)
