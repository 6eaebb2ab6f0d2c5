"""NonFiniteLossGuard: a NaN/inf loss skips the optimizer step, is counted and logged; too many in a row stop the run.

In-process, a MONAI SupervisedTrainer with a 1-layer network and a loss that returns NaN on chosen iterations. Runs
in fp32 on CPU (the guard does not rely on GradScaler); the AMP variant runs where CUDA is available.
"""
from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from hybridmim_components.nonfinite import NonFiniteLossError, NonFiniteLossGuard


class _NanOn(torch.nn.Module):
    """MSE loss, NaN on the (1-based) iterations listed in ``nan_at``, finite loss but inf gradients on ``inf_grad_at``."""

    def __init__(self, nan_at=(), inf_grad_at=()):
        super().__init__()
        self.nan_at, self.inf_grad_at, self.calls = set(nan_at), set(inf_grad_at), 0

    def forward(self, pred, target):
        self.calls += 1
        loss = ((pred - target) ** 2).mean()
        if self.calls in self.nan_at:
            return loss * float("nan")
        if self.calls in self.inf_grad_at:
            return loss + torch.sqrt(pred.abs().sum() * 0)  # value +0, d/dpred sqrt(0) = inf
        return loss


def _trainer(loss, iterations, guard=None, amp=False, device="cpu"):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1).to(device)
    data = [{"image": torch.ones(2, 3), "label": torch.zeros(2, 1)} for _ in range(iterations)]
    trainer = SupervisedTrainer(
        device=torch.device(device), max_epochs=1, train_data_loader=data, network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1), loss_function=loss, amp=amp,
        prepare_batch=lambda b, device, non_blocking, **kw: (b["image"].to(device), b["label"].to(device)),
    )
    if guard is not None:
        guard.attach(trainer)
    weights = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.append(net.weight.detach().clone()))
    return trainer, net, weights


def test_without_the_guard_one_nan_loss_poisons_the_weights():
    trainer, net, _ = _trainer(_NanOn(nan_at={1}), 1)
    trainer.run()
    assert torch.isnan(net.weight).all()  # what the guard prevents


def test_nan_loss_skips_the_step_and_is_logged(caplog):
    guard = NonFiniteLossGuard(max_nonfinite_steps=5)
    trainer, net, weights = _trainer(_NanOn(nan_at={2, 3}), 4, guard)
    with caplog.at_level(logging.WARNING, logger="hybridmim_components.nonfinite"):
        trainer.run()
    # iterations 2 and 3 changed nothing (not even AdamW's weight decay); 1 and 4 stepped
    assert torch.equal(weights[1], weights[0]) and torch.equal(weights[2], weights[0])
    assert not torch.equal(weights[3], weights[2]) and torch.isfinite(net.weight).all()
    assert guard.total == 2 and guard.consecutive == 0  # the finite 4th loss reset the streak
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("iteration 2: loss nan; optimizer step skipped (1 in a row, 1 in this run")
    assert messages[1].startswith("iteration 3: loss nan; optimizer step skipped (2 in a row, 2 in this run")


def test_skipped_step_leaves_the_optimizer_state_alone():
    guard = NonFiniteLossGuard()
    trainer, _, _ = _trainer(_NanOn(nan_at={2}), 2, guard)
    trainer.run()
    steps = [s["step"] for s in trainer.optimizer.state.values()]
    assert [float(s) for s in steps] == [1.0, 1.0]  # AdamW counted only the finite iteration


def test_non_finite_gradients_with_a_finite_loss_skip_too():
    guard = NonFiniteLossGuard()
    trainer, net, weights = _trainer(_NanOn(inf_grad_at={1}), 1, guard)
    trainer.run()
    assert guard.total == 1 and torch.isfinite(net.weight).all()


def test_stops_after_max_nonfinite_steps_in_a_row():
    guard = NonFiniteLossGuard(max_nonfinite_steps=3)
    loss = _NanOn(nan_at={1, 3, 4, 5, 6, 7})  # 1 alone, then 3, 4, 5 in a row
    trainer, net, _ = _trainer(loss, 8, guard)
    with pytest.raises(NonFiniteLossError, match=r"iteration 5: .*3 iterations in a row \(max_nonfinite_steps=3\)"):
        trainer.run()
    assert trainer.state.iteration == 5 and loss.calls == 5
    assert torch.isfinite(net.weight).all()


def test_zero_never_stops():
    guard = NonFiniteLossGuard(max_nonfinite_steps=0)
    trainer, _, _ = _trainer(_NanOn(nan_at=set(range(1, 7))), 6, guard)
    trainer.run()
    assert guard.total == 6 and guard.consecutive == 6


@pytest.mark.parametrize("bad", [-1, 1.5, True, "20"])
def test_invalid_max_nonfinite_steps(bad):
    with pytest.raises((ValueError, TypeError)):
        NonFiniteLossGuard(max_nonfinite_steps=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP (GradScaler) needs CUDA")
def test_amp_nan_loss_skipped_counted_and_stops():
    guard = NonFiniteLossGuard(max_nonfinite_steps=2)
    trainer, net, weights = _trainer(_NanOn(nan_at={2, 4, 5}), 6, guard, amp=True, device="cuda")
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=2"):
        trainer.run()
    assert torch.equal(weights[1], weights[0]) and not torch.equal(weights[2], weights[1])
    assert trainer.state.iteration == 5 and guard.total == 3 and torch.isfinite(net.weight).all()
