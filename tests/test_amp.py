"""Mixed precision: every HybridMIM loss term is computed in float32 under autocast, the bundles pass ``amp_dtype`` to
MONAI's engines, and the GradScaler's state travels in the full checkpoint.

Autocast is exercised on CPU with bfloat16 (the CUDA float16 path uses the same code): a loss computed inside
``torch.autocast`` must equal, to float32 round-off, the loss computed without autocast on the same inputs rounded
to bfloat16 (what the network would hand it).
"""
from __future__ import annotations

import logging

import pytest
import torch

from hybridmim_components import (
    DropoutContrastiveLoss,
    HybridMIMLoss,
    MaskConsistencyLoss,
    MaskLocationLoss,
    MaskNumberLoss,
    PartialRegionReconstructionLoss,
)
from hybridmim_components.workflow.checkpoints import GradScalerState
from hybridmim_components.workflow.mixed_precision import AMP_DTYPES, amp_kwargs
from hybridmim_components.masking import MIM_COUNT, MIM_LOCATION, MIM_PATCH_MASK, MIM_TARGET

B, N, P = 3, 8, 16  # batch, sub-volumes (2×2×2 of 32³ in a 64³ crop), embedding size


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16 and back: the values a bf16 network output holds, in float32."""
    return t.to(torch.bfloat16).float()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    patch_mask = torch.rand(B, 4, 4, 4, generator=g) < 0.6  # 16³ patches of a 64³ crop
    return {
        "reconstruction": _bf16(torch.randn(B, 1, 32, 32, 32, generator=g)),
        "target": torch.randn(B, 1, 64, 64, 64, generator=g),
        "patch_mask": patch_mask,
        "region": (slice(16, 48),) * 3,
        "number_logits": _bf16(3 * torch.randn(B, N, 9, generator=g)),
        "location_logits": _bf16(3 * torch.randn(B, N, 8, generator=g)),
        "count": torch.randint(0, 9, (B, N), generator=g),
        "location": (torch.rand(B, N, 8, generator=g) < 0.5).float(),
        # nearly parallel embeddings: cosine similarities close to 1, where bf16 (8 bits of mantissa) loses most
        "z1": _bf16(torch.ones(B, P) + 0.05 * torch.randn(B, P, generator=g)),
        "z2": _bf16(torch.ones(B, P) + 0.05 * torch.randn(B, P, generator=g)),
    }


def _terms(i: dict, half: bool) -> dict:
    """The five loss terms; network outputs handed over as bfloat16 tensors when ``half`` (as under autocast)."""
    cast = (lambda t: t.to(torch.bfloat16)) if half else (lambda t: t)
    return {
        "reconstruction": PartialRegionReconstructionLoss()(
            cast(i["reconstruction"]), i["target"], i["patch_mask"], i["region"]
        ),
        "number": MaskNumberLoss()(cast(i["number_logits"]), i["count"]),
        "location": MaskLocationLoss()(cast(i["location_logits"]), i["location"]),
        "consistency": MaskConsistencyLoss()(cast(i["number_logits"]), cast(i["location_logits"])),
        "contrastive": DropoutContrastiveLoss(temperature=0.1)(cast(i["z1"]), cast(i["z2"])),
    }


def test_every_loss_term_is_float32_under_autocast_and_equals_the_float32_computation():
    i = _inputs()
    reference = _terms(i, half=False)  # no autocast, float32 inputs holding bf16-representable values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _terms(i, half=True)
    for name, value in mixed.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6, msg=name)


def test_float32_inputs_under_autocast_are_not_rounded_inside_the_loss():
    # autocast alone would run the contrastive similarity matmul in bf16 even on float32 embeddings
    i = _inputs(1)
    reference = _terms(i, half=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _terms(i, half=False)
    for name, value in mixed.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6, msg=name)


def test_hybridmim_loss_terms_and_gradients_are_float32_under_autocast():
    i = _inputs(2)
    leaves = {k: i[k].clone().to(torch.bfloat16).requires_grad_() for k in
              ("reconstruction", "number_logits", "location_logits", "z1", "z2")}
    outputs = {
        "reconstruction": leaves["reconstruction"],
        "region_slices": i["region"],
        "number_logits": leaves["number_logits"],
        "location_logits": leaves["location_logits"],
        "embeddings": (leaves["z1"], leaves["z2"]),
    }
    batch = {MIM_TARGET: i["target"], MIM_PATCH_MASK: i["patch_mask"], MIM_COUNT: i["count"],
             MIM_LOCATION: i["location"]}
    loss_fn = HybridMIMLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = loss_fn(outputs, batch)
    assert total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in loss_fn.last_terms.values()), {
        k: v.dtype for k, v in loss_fn.last_terms.items()}
    total.backward()
    # the gradient flows back to the bf16 outputs through the casts
    assert all(leaf.grad is not None and leaf.grad.dtype == torch.bfloat16 for leaf in leaves.values())
    ref_terms = _terms(i, half=False)
    ref_terms["contrastive"] = DropoutContrastiveLoss(0.5)(i["z1"], i["z2"])
    expected = ref_terms["reconstruction"] + 0.1 * ref_terms["number"] + 0.1 * ref_terms["location"] + (
        0.01 * ref_terms["consistency"] + 0.1 * ref_terms["contrastive"])
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)


def test_contrastive_term_without_embeddings_is_a_float32_zero():
    i = _inputs(3)
    outputs = {"reconstruction": i["reconstruction"].bfloat16(), "region_slices": i["region"],
               "number_logits": i["number_logits"].bfloat16(), "location_logits": i["location_logits"].bfloat16(),
               "embeddings": None}
    batch = {MIM_TARGET: i["target"], MIM_PATCH_MASK: i["patch_mask"], MIM_COUNT: i["count"],
             MIM_LOCATION: i["location"]}
    loss_fn = HybridMIMLoss()
    loss_fn(outputs, batch)
    assert loss_fn.last_terms["contrastive"].dtype == torch.float32
    assert loss_fn.last_terms["contrastive"].item() == 0.0


# --- amp_dtype ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                          (" BFloat16 ", torch.bfloat16), ("torch.float16", torch.float16),
                                          (torch.bfloat16, torch.bfloat16)])
def test_amp_kwargs_accepts_the_two_half_precisions(value, dtype):
    assert amp_kwargs(value) == {"dtype": dtype}
    assert set(AMP_DTYPES) == {"float16", "bfloat16"}


@pytest.mark.parametrize("value", ["float32", "fp16", "", None, torch.float32, 16])
def test_amp_kwargs_names_the_key_and_value_it_refuses(value):
    with pytest.raises(ValueError, match=r"amp_dtype must be one of \['bfloat16', 'float16'\], got"):
        amp_kwargs(value)


# --- GradScaler state in the full checkpoint -------------------------------------------------------------------------
class _Trainer:
    """What GradScalerState reads of MONAI's trainer: ``scaler`` (set by ``trainer.run()``)."""

    def __init__(self, scaler) -> None:
        self.scaler = scaler


def _calibrated_scaler() -> torch.amp.GradScaler:
    """A CPU GradScaler after one overflowing step (scale halved, step skipped) and one finite step."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    for factor in (float("inf"), 1.0):
        optimizer.zero_grad()
        scaler.scale((weight * factor).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return scaler


def test_grad_scaler_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    scaler = _calibrated_scaler()
    assert scaler.get_scale() == 2.0**9 and scaler.state_dict()["_growth_tracker"] == 1  # the state to keep
    path = tmp_path / "checkpoint.pt"
    torch.save({"grad_scaler": GradScalerState(_Trainer(scaler)).state_dict()}, path)

    fresh = torch.amp.GradScaler("cpu")  # what trainer.run() of the resumed run creates: scale 2^16
    GradScalerState(_Trainer(fresh)).load_state_dict(torch.load(path, weights_only=True)["grad_scaler"])
    assert fresh.get_scale() == 2.0**9
    assert fresh.state_dict() == scaler.state_dict()


def test_grad_scaler_state_without_a_scaler_saves_and_resumes(tmp_path, caplog):
    # amp off (MONAI: trainer.scaler is None) or no CUDA (a disabled scaler): the checkpoint still saves and loads
    for missing in (None, torch.amp.GradScaler("cpu", enabled=False)):
        assert GradScalerState(_Trainer(missing)).state_dict() == {"state": {}}
    path = tmp_path / "checkpoint.pt"
    torch.save({"grad_scaler": GradScalerState(_Trainer(None)).state_dict()}, path)
    saved = torch.load(path, weights_only=True)["grad_scaler"]

    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with caplog.at_level(logging.INFO, logger="hybridmim_components.workflow.checkpoints"):
        GradScalerState(_Trainer(fresh)).load_state_dict(saved)  # float32 checkpoint, AMP resume: scaler untouched
        assert fresh.get_scale() == 2.0**12
        GradScalerState(_Trainer(None)).load_state_dict(GradScalerState(_Trainer(_calibrated_scaler())).state_dict())
    assert "starts afresh" in caplog.text and "ignored" in caplog.text


def test_grad_scaler_state_reads_the_scaler_the_trainer_holds_when_called():
    # MONAI's trainer creates trainer.scaler in run(), after the checkpoint objects were built
    trainer = _Trainer(None)
    state = GradScalerState(trainer)
    trainer.scaler = _calibrated_scaler()
    assert state.state_dict()["state"]["scale"] == 2.0**9


# --- the bundles wire both -------------------------------------------------------------------------------------------
def _train_configs():
    import glob
    import json
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles")
    for path in sorted(glob.glob(os.path.join(root, "*", "configs", "train.json"))):
        with open(path, encoding="utf-8") as f:
            yield os.path.basename(os.path.dirname(os.path.dirname(path))), json.load(f)


def test_every_bundle_saves_and_resumes_the_grad_scaler_and_passes_amp_dtype():
    configs = dict(_train_configs())
    assert len(configs) == 12
    for name, cfg in configs.items():
        train = cfg["train"]
        assert cfg["amp_dtype"] == "float16", name  # MONAI's default stays the default
        assert train["grad_scaler"]["_target_"] == "hybridmim_components.workflow.GradScalerState", name
        assert train["grad_scaler"]["trainer"] == "@train#trainer", name
        assert train["checkpoint_saver"]["save_dict"]["grad_scaler"] == "@train#grad_scaler", name
        assert train["checkpoint_loader"]["load_dict"]["grad_scaler"] == "@train#grad_scaler", name
        for engine in (train["trainer"], cfg["validate"]["evaluator"]):
            assert engine["amp_kwargs"] == "$hybridmim_components.workflow.amp_kwargs(@amp_dtype)", name


def test_bundle_amp_dtype_override_reaches_the_engine_arguments():
    from monai.bundle import ConfigParser

    name, cfg = next(iter(_train_configs()))
    parser = ConfigParser(cfg)
    parser["amp_dtype"] = "bfloat16"
    assert parser.get_parsed_content("train#trainer#amp_kwargs") == {"dtype": torch.bfloat16}
    parser["amp_dtype"] = "float32"
    with pytest.raises(Exception) as info:  # MONAI wraps the helper's error: look along the chain
        parser.get_parsed_content("train#trainer#amp_kwargs", lazy=False)
    chain, error = [], info.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert any("ValueError: amp_dtype must be one of" in c and "'float32'" in c for c in chain), chain
