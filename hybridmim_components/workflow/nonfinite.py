"""A training guard: a non-finite loss or gradient skips the optimizer step, is counted and logged, and too many in a
row stop the run.

The check runs at ``IterationEvents.BACKWARD_COMPLETED``: after ``backward`` (under DDP the gradients are already
all-reduced) and before ``scaler.step``/``optimizer.step``. Without AMP a bad step's gradients are cleared (torch
optimizers skip parameters whose ``grad`` is ``None``: no update, no weight decay, no moment update). With AMP they are
set to NaN, so ``GradScaler`` skips the step and lowers its scale; steps that ``GradScaler`` skips on its own
(finite loss, overflowing gradients) are counted too: a few in a row while it calibrates are normal,
``max_nonfinite_steps`` in a row are not. Under DDP the skip flag is all-reduced (MAX) once per iteration, so every
rank skips the same steps, counts the same and stops at the same iteration.
"""
from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from hybridmim_components.utils.distributed import max_over_ranks

__all__ = ["NonFiniteLossGuard", "NonFiniteLossError"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive iterations with a non-finite loss or gradient."""


class NonFiniteLossGuard:
    """Skip the optimizer step of an iteration whose loss or gradient is NaN/inf (on any rank); stop after too many.

    Attach to a MONAI ``SupervisedTrainer`` (it fires ``IterationEvents.BACKWARD_COMPLETED`` and owns ``optimizer``).
    The guard is defined at the top level of a bundle config and attached in ``initialize`` (it references the
    trainer).

    Args:
        max_nonfinite_steps: consecutive skipped iterations after which the run stops with
            :class:`NonFiniteLossError`; ``0`` never stops (steps are still skipped and logged).

    Attributes:
        consecutive: skipped iterations in a row so far; ``total``: skipped iterations of this run.
    """

    def __init__(self, max_nonfinite_steps: int = 20) -> None:
        if isinstance(max_nonfinite_steps, bool) or int(max_nonfinite_steps) != max_nonfinite_steps or max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be a non-negative integer, got {max_nonfinite_steps!r}.")
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.consecutive = 0
        self.total = 0
        self._what: str | None = None  # why this iteration's step was skipped; None: it was not

    def attach(self, engine: Engine) -> None:
        if getattr(engine, "optimizer", None) is None:
            raise ValueError("NonFiniteLossGuard needs a trainer with an optimizer (monai SupervisedTrainer).")
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._backward_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    # --- event handlers -------------------------------------------------------------------------------------------
    def _iteration_started(self, engine: Engine) -> None:
        self._what = None

    def _backward_completed(self, engine: Engine) -> None:
        """Flag a non-finite loss/gradient (one sync; one all-reduce under DDP) and neutralise the coming step."""
        loss = engine.state.output[Keys.LOSS].detach()
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad_loss = ~torch.isfinite(loss).all()
        bad_grads = ~torch.stack([torch.isfinite(p.grad).all() for p in params]).all() if params else torch.zeros_like(bad_loss)
        bad = torch.stack([bad_loss, bad_grads]).float()  # (2,): this rank's loss, gradients
        flags = torch.cat([bad, max_over_ranks(bad.clone())]).tolist()  # local loss, local grads, any rank
        if not (flags[2] or flags[3]):
            return
        if flags[0]:
            self._what = f"loss {float(loss.float().mean())}"
        elif flags[1]:
            self._what = "finite loss but non-finite gradients"
        else:
            self._what = "non-finite loss or gradients on another rank"
        scaler = getattr(engine, "scaler", None)
        if engine.amp and scaler is not None and scaler.is_enabled():
            for p in params:  # GradScaler skips the step and lowers its scale, as on every other rank
                p.grad.fill_(float("nan"))
        else:
            for p in params:
                p.grad = None

    def _iteration_completed(self, engine: Engine) -> None:
        if self._what is None:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        logger.warning(
            "iteration %d: %s; optimizer step skipped (%d in a row, %d in this run; the run stops at "
            "max_nonfinite_steps=%d in a row).",
            engine.state.iteration, self._what, self.consecutive, self.total, self.max_nonfinite_steps,
        )
        if self.max_nonfinite_steps and self.consecutive >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"stopped at iteration {engine.state.iteration}: the loss or its gradients were non-finite (NaN/inf) "
                f"in {self.consecutive} iterations in a row (max_nonfinite_steps={self.max_nonfinite_steps}); their "
                "optimizer steps were skipped, so the weights are those of the last finite step. Likely causes: a "
                "learning rate too high, NaN/inf in the input data (check_data true reads every file), or fp16 "
                "overflow (try --amp false). Raise max_nonfinite_steps (0: never stop) to keep going."
            )

