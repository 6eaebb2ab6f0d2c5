"""Each loss against a hand-written formula on tiny tensors, edge cases, gradients, and DDP negatives."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hybridmim_components import (
    DropoutContrastiveLoss,
    HierarchicalMaskd,
    HybridMIMLoss,
    MaskConsistencyLoss,
    MaskLocationLoss,
    MaskNumberLoss,
    PartialRegionReconstructionLoss,
)


def test_reconstruction_is_mse_over_masked_voxels_in_region_only():
    torch.manual_seed(0)
    target = torch.rand(2, 2, 8, 8, 8)
    patch_mask = torch.rand(2, 4, 4, 4) > 0.5  # p = 2
    region = (slice(2, 6), slice(0, 8), slice(4, 8))
    recon = torch.rand(2, 2, 4, 8, 4)
    total, n = 0.0, 0
    for b in range(2):
        for z in range(4):
            for y in range(8):
                for x in range(4):
                    vz, vy, vx = z + 2, y, x + 4  # voxel in crop coordinates
                    if patch_mask[b, vz // 2, vy // 2, vx // 2]:
                        for c in range(2):
                            total += float((recon[b, c, z, y, x] - target[b, c, vz, vy, vx]) ** 2)
                            n += 1
    value = PartialRegionReconstructionLoss()(recon, target, patch_mask, region)
    assert math.isclose(float(value), total / n, rel_tol=1e-5)


def test_reconstruction_edge_cases():
    target = torch.rand(1, 1, 8, 8, 8)
    region = (slice(0, 8),) * 3
    mask = torch.ones(1, 4, 4, 4, dtype=torch.bool)
    assert float(PartialRegionReconstructionLoss()(target.clone(), target, mask, region)) == 0.0  # identical
    recon = torch.rand(1, 1, 8, 8, 8, requires_grad=True)
    value = PartialRegionReconstructionLoss()(recon, target, torch.zeros_like(mask), region)  # nothing masked
    value.backward()
    assert float(value) == 0.0 and torch.all(recon.grad == 0)
    # errors outside the mask do not count
    mask = torch.zeros_like(mask)
    mask[0, 0, 0, 0] = True
    recon = target.clone()
    recon[..., 4:, 4:, 4:] += 5.0
    assert float(PartialRegionReconstructionLoss()(recon, target, mask, region)) == 0.0


def test_number_and_location_against_formulas():
    torch.manual_seed(1)
    logits, count = torch.randn(2, 3, 9), torch.randint(0, 9, (2, 3))
    by_hand = -sum(torch.log_softmax(logits[b, j], 0)[count[b, j]] for b in range(2) for j in range(3)) / 6
    assert math.isclose(float(MaskNumberLoss()(logits, count)), float(by_hand), rel_tol=1e-5)
    loc_logits, loc = torch.randn(2, 3, 8), (torch.rand(2, 3, 8) > 0.5).float()
    p = torch.sigmoid(loc_logits)
    by_hand = -(loc * torch.log(p) + (1 - loc) * torch.log(1 - p)).mean()
    assert math.isclose(float(MaskLocationLoss()(loc_logits, loc)), float(by_hand), rel_tol=1e-5)


def test_consistency_against_formula_and_gradients_reach_both_heads():
    torch.manual_seed(2)
    number = torch.randn(2, 4, 9, requires_grad=True)
    location = torch.randn(2, 4, 8, requires_grad=True)
    value = MaskConsistencyLoss()(number, location)
    p = torch.sigmoid(location.detach())
    hard = (p > 0.5).sum(-1)
    ce = -sum(torch.log_softmax(number.detach()[b, j], 0)[hard[b, j]] for b in range(2) for j in range(4)) / 8
    expected = (torch.softmax(number.detach(), -1) * torch.arange(9.0)).sum(-1)
    mse = ((p.sum(-1) - expected) ** 2).mean()
    assert math.isclose(float(value), float(ce + mse), rel_tol=1e-5)
    value.backward()
    assert number.grad.abs().sum() > 0 and location.grad.abs().sum() > 0


def test_consistency_is_zero_only_in_the_ce_limit_when_heads_agree():
    # location says exactly 3 masked; number head puts (almost) all mass on 3 -> both terms ~0
    location = torch.full((1, 1, 8), -20.0)
    location[..., :3] = 20.0
    number = torch.full((1, 1, 9), -30.0)
    number[..., 3] = 30.0
    assert float(MaskConsistencyLoss()(number, location)) < 1e-6


def nt_xent_by_hand(z1, z2, tau):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[pos]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


def test_contrastive_against_formula_and_gradients_reach_both_views():
    torch.manual_seed(3)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    value = DropoutContrastiveLoss(temperature=0.5)(z1, z2)
    assert math.isclose(float(value), nt_xent_by_hand(z1.detach(), z2.detach(), 0.5), rel_tol=1e-5)
    value.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_contrastive_identical_orthonormal_views():
    """Identical views of orthonormal samples: positive similarity 1, every negative 0."""
    b, tau = 3, 0.5
    z = torch.eye(b, 5)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (2 * b - 2)))
    assert math.isclose(float(DropoutContrastiveLoss(tau)(z, z.clone())), expected, rel_tol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, z1, z2, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = z1.shape[0] // world
    a1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    a2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = DropoutContrastiveLoss(0.5)(a1, a2)
    loss.backward()
    # DDP averages gradients over ranks; mimic that for the embeddings' gradients
    out[rank] = (float(loss), a1.grad * 1.0 / world, a2.grad * 1.0 / world)
    dist.destroy_process_group()


def test_ddp_gathers_negatives_from_all_ranks_with_gradient():
    torch.manual_seed(4)
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    full1, full2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    reference = DropoutContrastiveLoss(0.5)(full1, full2)
    reference.backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), z1, z2, out), nprocs=2, join=True)
    mean_loss = (out[0][0] + out[1][0]) / 2
    assert math.isclose(mean_loss, float(reference), rel_tol=1e-5)
    # each rank's local gradient (after averaging) equals the single-process gradient of its samples
    grad1 = torch.cat([out[0][1], out[1][1]])
    grad2 = torch.cat([out[0][2], out[1][2]])
    torch.testing.assert_close(grad1, full1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad2, full2.grad, rtol=1e-4, atol=1e-6)


def test_hybrid_loss_is_the_weighted_sum_with_paper_defaults():
    torch.manual_seed(5)
    sample = HierarchicalMaskd("image").set_random_state(0)({"image": torch.rand(1, 64, 64, 64)})
    batch = {k: sample[k].unsqueeze(0).repeat(2, *([1] * sample[k].ndim)) for k in sample if k.startswith("mim_")}
    outputs = {
        "reconstruction": torch.rand(2, 1, 32, 32, 32),
        "region_slices": (slice(16, 48),) * 3,
        "number_logits": torch.randn(2, 8, 9),
        "location_logits": torch.randn(2, 8, 8),
        "embeddings": (torch.randn(2, 16), torch.randn(2, 16)),
    }
    loss = HybridMIMLoss()
    total = loss(outputs, batch)
    terms = {
        "reconstruction": PartialRegionReconstructionLoss()(
            outputs["reconstruction"], batch["mim_target"], batch["mim_patch_mask"], outputs["region_slices"]
        ),
        "number": MaskNumberLoss()(outputs["number_logits"], batch["mim_count"]),
        "location": MaskLocationLoss()(outputs["location_logits"], batch["mim_location"]),
        "consistency": MaskConsistencyLoss()(outputs["number_logits"], outputs["location_logits"]),
        "contrastive": DropoutContrastiveLoss(0.5)(*outputs["embeddings"]),
    }
    weights = {"reconstruction": 1.0, "number": 0.1, "location": 0.1, "consistency": 0.01, "contrastive": 0.1}
    assert math.isclose(float(total), float(sum(weights[k] * v for k, v in terms.items())), rel_tol=1e-5)
    assert set(loss.last_terms) == {"loss", *terms}
    for name, value in terms.items():
        assert math.isclose(float(loss.last_terms[name]), float(value), rel_tol=1e-5)
    outputs["embeddings"] = None  # eval mode: no contrastive term
    loss(outputs, batch)
    assert float(loss.last_terms["contrastive"]) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        DropoutContrastiveLoss(0.0)
    with pytest.raises(ValueError, match="same shape"):
        DropoutContrastiveLoss()(torch.randn(2, 3), torch.randn(3, 3))


def test_consistency_soft_count_term_alone_has_the_hand_gradient_in_both_heads():
    """The MSE between the two soft counts, with the CE term subtracted, against hand values and gradients.

    Two sub-volumes with round numbers: sigmoid(±log 3) = 0.75 / 0.25, and number logits log(w) (softmax = w/Σw).
    sub-volume 0: location all 0.75 -> soft count S = 6, hard count 8; uniform number head -> E = 4.
    sub-volume 1: four 0.75 and four 0.25 -> S = 4, hard count 4; w = 8 on count 2, 1 elsewhere -> p_2 = 1/2,
    p_n = 1/16 otherwise, E = 2/2 + (0+1+3+4+5+6+7+8)/16 = 3.125.
    MSE = ((6 − 4)² + (4 − 3.125)²) / 2; per sub-volume dMSE/dloc_k = 2 (S − E) σ(1 − σ) / 2 and
    dMSE/dz_n = −2 (S − E) p_n (n − E) / 2.
    """
    log3 = math.log(3.0)
    location = torch.tensor([[[log3] * 8, [log3] * 4 + [-log3] * 4]], requires_grad=True)  # 1×2×8
    weights = torch.ones(2, 9)
    weights[1, 2] = 8.0
    number = weights.log().unsqueeze(0).requires_grad_(True)  # 1×2×9
    value = MaskConsistencyLoss()(number, location)
    # the CE term, written out with the hard counts 8 and 4, subtracted with its graph
    ce = -(torch.log_softmax(number[0, 0], 0)[8] + torch.log_softmax(number[0, 1], 0)[4]) / 2
    soft_term = value - ce
    soft, expected = (6.0, 4.0), (4.0, 3.125)
    mse = ((6.0 - 4.0) ** 2 + (4.0 - 3.125) ** 2) / 2
    assert math.isclose(float(soft_term), mse, rel_tol=1e-5)
    soft_term.backward()
    # location: d/dl_k (S − E)² / 2 = (S − E) σ'(l_k), σ' = 0.75 · 0.25 = 3/16 for both ±log 3
    loc_grad = torch.tensor([[[(soft[j] - expected[j]) * 3 / 16] * 8 for j in range(2)]])
    torch.testing.assert_close(location.grad, loc_grad, rtol=1e-5, atol=1e-7)
    # number: dE/dz_n = p_n (n − E), so d/dz_n (S − E)² / 2 = −(S − E) p_n (n − E)
    probs = [[1 / 9] * 9, [1 / 16, 1 / 16, 1 / 2] + [1 / 16] * 6]
    num_grad = torch.tensor([[[-(soft[j] - expected[j]) * probs[j][n] * (n - expected[j]) for n in range(9)]
                              for j in range(2)]])
    torch.testing.assert_close(number.grad, num_grad, rtol=1e-5, atol=1e-7)
    assert location.grad.abs().min() > 0 and number.grad.abs().sum() > 0  # the term reaches both heads
