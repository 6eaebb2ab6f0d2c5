"""Reproducible random draws in the bundles' workflows: the same validation masks every time
(:class:`ReseedHandler`) and the random states of training in the full checkpoint (:class:`RandomStates`)."""
from __future__ import annotations

import logging
import random
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable, Transform

from hybridmim_components.utils.distributed import rank_and_world_size

__all__ = ["ReseedHandler", "RandomStates", "transform_generators"]

logger = logging.getLogger(__name__)


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


# --- exact resume -------------------------------------------------------------------------------------------------
def _numpy_state(generator: np.random.RandomState) -> dict:
    """A ``RandomState`` as plain values and a tensor (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached = generator.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _set_numpy_state(generator: np.random.RandomState, state: Mapping) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    generator.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def transform_generators(transform) -> list[np.random.RandomState]:
    """Every ``Randomizable``'s own generator (``.R``) reachable from ``transform``, in a fixed order.

    Walks ``Compose.transforms`` and the attributes of transforms (e.g. the cropper inside
    ``RandSpatialCropSamplesd``), so that nested generators are found too; each generator is listed once.
    """
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable) and isinstance(getattr(obj, "R", None), np.random.RandomState):
            if id(obj.R) not in seen:
                seen.add(id(obj.R))
                found.append(obj.R)
        if isinstance(obj, (list, tuple)):
            children = obj
        elif isinstance(obj, Mapping):
            children = list(obj.values())
        elif isinstance(obj, (Transform, Randomizable)):
            children = list(vars(obj).values())
        else:
            return
        for child in children:
            visit(child, depth + 1)

    visit(transform, 0)
    return found


class RandomStates:
    """The random states of a training run, as a stateful object for the full checkpoint: exact resume.

    ``set_determinism(seed)`` runs at every start, so without this a resumed run would replay the first epochs'
    crops, masks and dropout. At every ``EPOCH_COMPLETED`` (before the checkpoint is written: attach this before
    the ``CheckpointSaver``) :meth:`snapshot` records, per process, torch's CPU (and CUDA) generator, numpy's and
    Python's global generators and the own generator of every random transform in ``transforms``; under DDP the
    snapshots of all ranks are gathered (one ``all_gather_object``) so that rank 0's checkpoint holds each rank's.
    A resumed run puts them back at the first ``EPOCH_STARTED`` (:meth:`restore`), i.e. after the start handlers
    (a validation at start draws nothing the run depends on), before the epoch's data iterator and its sampler
    order are drawn. Data-loader workers derive their seeds from torch's generator, so they follow.

    Exact for checkpoints written at the end of an epoch (every interval checkpoint). A final checkpoint written by
    an exception in the middle of an epoch resumes without its random states (logged): nothing is lost, but the
    rest of that run draws other crops than an uninterrupted one would have.

    Args:
        trainer: the training engine (its iteration tells whether the snapshot belongs to a checkpoint).
        transforms: the training preprocessing (``Compose``), whose random transforms' generators are recorded.
    """

    def __init__(self, trainer, transforms=None) -> None:
        self.trainer = trainer
        self.generators = transform_generators(transforms) if transforms is not None else []
        self._snapshot: dict = {}
        self._pending: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.snapshot)
        engine.add_event_handler(Events.EPOCH_STARTED, self.restore)

    def _local(self) -> dict:
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.mtrand._rand),
            "python": {"version": version, "internal": torch.tensor(internal), "gauss_next": gauss_next},
            "transforms": [_numpy_state(g) for g in self.generators],
        }

    def snapshot(self, engine: Engine | None = None) -> None:
        """Record the states of every process (collective under DDP: called on every rank at the same event)."""
        rank, world = rank_and_world_size()
        local = self._local()
        ranks = [local]
        if world > 1:
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, local)
        self._snapshot = {"iteration": int(self.trainer.state.iteration), "world_size": world, "ranks": ranks}

    def state_dict(self) -> dict:
        return dict(self._snapshot)

    def load_state_dict(self, state_dict: Mapping) -> None:
        rank, world = rank_and_world_size()
        if not state_dict:
            logger.info("the checkpoint holds no random states (written before any epoch ended): fresh draws.")
            return
        iteration = int(getattr(self.trainer.state, "iteration", -1))
        if state_dict["iteration"] != iteration:
            logger.warning(
                f"the checkpoint was written at iteration {iteration}, in the middle of an epoch (its random states "
                f"are those of iteration {state_dict['iteration']}): resuming with fresh draws, not bit for bit."
            )
            return
        if state_dict["world_size"] != world:
            logger.warning(
                f"the checkpoint holds the random states of {state_dict['world_size']} process(es), this run has "
                f"{world}: resuming with fresh draws, not bit for bit."
            )
            return
        self._pending = state_dict["ranks"][rank]

    def missing_from_checkpoint(self, path: str) -> None:
        """The resumed checkpoint has no random states at all (written by a version before they were saved): logged;
        the run goes on with fresh draws (called by ``ResumeFromLatestCheckpoint``, which then loads the rest)."""
        logger.warning(f"'{path}' holds no random states (written by an earlier version): the resume is not exact, "
                       "the rest of the run draws other crops, masks and dropout than an uninterrupted run would.")

    def restore(self, engine: Engine | None = None) -> None:
        """Put back the states loaded from a checkpoint, once (the first epoch of a resumed run)."""
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        exact = self._restore_cuda(state["cuda"])
        _set_numpy_state(np.random.mtrand._rand, state["numpy"])
        python = state["python"]
        random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss_next"]))
        if len(state["transforms"]) != len(self.generators):
            exact = False
            logger.warning(f"the checkpoint holds {len(state['transforms'])} transform generators, the preprocessing "
                           f"has {len(self.generators)}: transform draws are not restored, the resume is not exact.")
        else:
            for generator, saved in zip(self.generators, state["transforms"]):
                _set_numpy_state(generator, saved)
        if exact:
            logger.info(f"restored the random states of iteration {self.trainer.state.iteration}: the run continues "
                        "exactly as an uninterrupted one.")
        else:
            logger.info(f"restored the random states of iteration {self.trainer.state.iteration} but those named "
                        "above: the run continues, not bit for bit as an uninterrupted one.")

    @staticmethod
    def _restore_cuda(saved: list) -> bool:
        """Put back the CUDA generators of every GPU of this process; False (logged) when the GPUs differ from the
        killed run's (another count, or CPU instead of GPU): their states cannot be restored."""
        now = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(saved) == now:
            if now:
                torch.cuda.set_rng_state_all(saved)
            return True

        def gpus(n: int) -> str:
            return f"{n} GPU(s)" if n else "no GPU"

        logger.warning(f"the resume is not exact: the checkpoint was written with {gpus(len(saved))}, this process has "
                       f"{gpus(now)}, so the CUDA random states (dropout and any draw on the GPU) cannot be restored and "
                       "start afresh; CPU, numpy, Python and transform draws are restored.")
        return False
