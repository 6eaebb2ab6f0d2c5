"""A training guard: a non-finite loss skips the optimizer step, is counted and logged, and too many in a row stop.

With AMP, ``GradScaler`` already skips a step whose gradients overflow and lowers its scale; that is normal while
it calibrates. A loss that is NaN/inf step after step is not: the run makes no progress (AMP) or writes NaN into
every weight at the first such step (fp32). :class:`NonFiniteLossGuard` handles both the same way, without relying
on ``GradScaler``'s internals: it looks at the loss and, just before ``optimizer.step``, at the gradients (after any
unscaling), and when either is non-finite it clears the gradients so that the step changes nothing (torch optimizers
skip parameters whose ``grad`` is ``None``: no update, no weight decay, no moment update).
"""
from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

__all__ = ["NonFiniteLossGuard", "NonFiniteLossError"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive iterations with a non-finite loss."""


class NonFiniteLossGuard:
    """Skip the optimizer step of an iteration whose loss (or gradient) is NaN/inf; stop after too many in a row.

    Attach to a MONAI ``SupervisedTrainer`` (it fires ``IterationEvents.LOSS_COMPLETED`` and owns ``optimizer``).
    The guard is defined at the top level of a bundle config and attached in ``initialize`` (it references the
    trainer).

    Args:
        max_nonfinite_steps: consecutive skipped iterations after which the run stops with
            :class:`NonFiniteLossError`; ``0`` never stops (steps are still skipped and logged).

    Attributes:
        consecutive: skipped iterations in a row so far; ``total``: skipped iterations of this run.

    Under DDP the gradients are all-reduced before the step, so a NaN loss on one process makes the gradients of
    every process non-finite and every process skips the same step.
    """

    def __init__(self, max_nonfinite_steps: int = 20) -> None:
        if isinstance(max_nonfinite_steps, bool) or int(max_nonfinite_steps) != max_nonfinite_steps or max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be a non-negative integer, got {max_nonfinite_steps!r}.")
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.consecutive = 0
        self.total = 0
        self._loss_value: float | None = None  # the iteration's loss when non-finite
        self._skipped = False

    def attach(self, engine: Engine) -> None:
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is None:
            raise ValueError("NonFiniteLossGuard needs a trainer with an optimizer (monai SupervisedTrainer).")
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._loss_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        optimizer.register_step_pre_hook(self._before_step)

    # --- event handlers -------------------------------------------------------------------------------------------
    def _iteration_started(self, engine: Engine) -> None:
        self._loss_value, self._skipped = None, False

    def _loss_completed(self, engine: Engine) -> None:
        loss = engine.state.output[Keys.LOSS].detach()
        if not bool(torch.isfinite(loss).all()):
            self._loss_value = float(loss.float().mean())

    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Optimizer step pre-hook: with a non-finite loss or gradient, clear the gradients so the step is a no-op.

        With AMP this runs only when ``GradScaler`` found the (unscaled) gradients finite and steps.
        """
        skip = self._loss_value is not None
        if not skip:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            # one flag per tensor, stacked: a single device sync per step
            skip = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if skip:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skipped = True

    def _iteration_completed(self, engine: Engine) -> None:
        if self._loss_value is None and not self._skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        what = f"loss {self._loss_value}" if self._loss_value is not None else "finite loss but non-finite gradients"
        logger.warning(
            "iteration %d: %s; optimizer step skipped (%d in a row, %d in this run; the run stops at "
            "max_nonfinite_steps=%d in a row).",
            engine.state.iteration, what, self.consecutive, self.total, self.max_nonfinite_steps,
        )
        if self.max_nonfinite_steps and self.consecutive >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"stopped at iteration {engine.state.iteration}: the loss was non-finite (NaN/inf) in "
                f"{self.consecutive} iterations in a row (max_nonfinite_steps={self.max_nonfinite_steps}); their "
                "optimizer steps were skipped, so the weights are those of the last finite step. Likely causes: a "
                "learning rate too high, NaN/inf in the input data (check_data true reads every file), or fp16 "
                "overflow (try --amp false). Raise max_nonfinite_steps (0: never stop) to keep going."
            )
