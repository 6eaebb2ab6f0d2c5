"""Two-level masking: exact counts, spatial grouping against a hand loop, explicit mask, reproducibility, errors."""
import itertools
import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from hybridmim_components import HierarchicalMask, HierarchicalMaskd, masked_voxels_in_region


def labels_by_hand(patch_mask: np.ndarray):
    """Counts and locations with explicit loops: sub-volumes in C order, offsets (dz, dy, dx) in C order."""
    d, h, w = (n // 2 for n in patch_mask.shape)
    counts, locations = [], []
    for z, y, x in itertools.product(range(d), range(h), range(w)):
        loc = [patch_mask[2 * z + dz, 2 * y + dy, 2 * x + dx] for dz, dy, dx in itertools.product((0, 1), repeat=3)]
        locations.append([float(v) for v in loc])
        counts.append(int(sum(loc)))
    return np.array(counts), np.array(locations)


@pytest.mark.parametrize("shape,ratio", [((64, 64, 64), 0.4), ((96, 96, 96), 0.4), ((32, 64, 96), 0.75), ((32, 32, 32), 0.1)])
def test_exact_count_and_spatial_grouping(shape, ratio):
    t = HierarchicalMaskd("image", sub_volume_size=32, patch_size=16, mask_ratio=ratio).set_random_state(3)
    out = t({"image": torch.rand(2, *shape)})
    mask = out["mim_patch_mask"]
    assert mask.dtype == torch.bool and tuple(mask.shape) == tuple(n // 16 for n in shape)
    assert int(mask.sum()) == round(ratio * mask.numel())
    counts, locations = labels_by_hand(mask.numpy())
    assert out["mim_count"].dtype == torch.int64 and out["mim_location"].dtype == torch.float32
    np.testing.assert_array_equal(out["mim_count"].numpy(), counts)
    np.testing.assert_array_equal(out["mim_location"].numpy(), locations)
    assert tuple(out["mim_location"].shape) == (len(counts), 8)


def test_masked_voxels_take_mask_value_and_target_is_original():
    image = torch.rand(3, 64, 32, 32) + 1.0  # strictly positive so that mask_value -1 is unambiguous
    t = HierarchicalMaskd("image", mask_ratio=0.5, mask_value=-1.0).set_random_state(0)
    out = t({"image": image})
    assert torch.equal(out["mim_target"], image)
    mask = out["mim_patch_mask"]
    for z, y, x in itertools.product(*(range(n) for n in mask.shape)):
        block = out["image"][:, 16 * z : 16 * z + 16, 16 * y : 16 * y + 16, 16 * x : 16 * x + 16]
        if mask[z, y, x]:
            assert torch.all(block == -1.0)
        else:
            assert torch.equal(block, image[:, 16 * z : 16 * z + 16, 16 * y : 16 * y + 16, 16 * x : 16 * x + 16])


def test_zero_padding_is_not_masking():
    """The authors' code found masked voxels by value == 0; here a zero-padded crop keeps an exact mask."""
    image = torch.zeros(1, 64, 64, 64)
    image[:, :32] = 1.0  # half of the crop is "padding"
    out = HierarchicalMaskd("image", mask_ratio=0.4).set_random_state(1)({"image": image})
    assert int(out["mim_patch_mask"].sum()) == round(0.4 * 64)
    assert int(out["mim_count"].sum()) == round(0.4 * 64)


def test_reproducible_with_set_random_state():
    image = torch.rand(1, 64, 64, 64)
    a = HierarchicalMaskd("image").set_random_state(7)({"image": image})
    b = HierarchicalMaskd("image").set_random_state(7)({"image": image})
    c = HierarchicalMaskd("image").set_random_state(8)({"image": image})
    assert torch.equal(a["mim_patch_mask"], b["mim_patch_mask"])
    assert not torch.equal(a["mim_patch_mask"], c["mim_patch_mask"])
    t = HierarchicalMaskd("image").set_random_state(7)
    first, second = t({"image": image}), t({"image": image})
    assert not torch.equal(first["mim_patch_mask"], second["mim_patch_mask"])  # a new draw per call


def test_array_version_matches_dictionary_version():
    image = torch.rand(1, 64, 64, 32)
    masked, patch_mask, count, location = HierarchicalMask(mask_ratio=0.3).set_random_state(5)(image)
    out = HierarchicalMaskd("image", mask_ratio=0.3).set_random_state(5)({"image": image})
    assert torch.equal(masked, out["image"]) and torch.equal(patch_mask, out["mim_patch_mask"])
    assert torch.equal(count, out["mim_count"]) and torch.equal(location, out["mim_location"])


def test_collates_in_a_monai_dataloader():
    data = [{"image": torch.rand(1, 64, 64, 64)} for _ in range(3)]
    loader = DataLoader(Dataset(data, Compose([HierarchicalMaskd("image")])), batch_size=3)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (3, 1, 64, 64, 64)
    assert tuple(batch["mim_patch_mask"].shape) == (3, 4, 4, 4)
    assert tuple(batch["mim_count"].shape) == (3, 8) and tuple(batch["mim_location"].shape) == (3, 8, 8)


def test_bad_sizes_are_refused_with_the_sizes_named():
    with pytest.raises(ValueError, match=r"sub_volume_size=32.*patch_size=8"):
        HierarchicalMaskd("image", sub_volume_size=32, patch_size=8)
    with pytest.raises(ValueError, match=r"\(64, 64, 80\).*sub_volume_size=32"):
        HierarchicalMaskd("image")({"image": torch.rand(1, 64, 64, 80)})
    with pytest.raises(ValueError, match="mask_ratio"):
        HierarchicalMaskd("image", mask_ratio=1.0)


def test_masked_voxels_in_region_by_hand():
    patch_mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    patch_mask[0, 1, 2, 3] = True  # voxels [8:16, 16:24, 24:32] with p = 8
    region = (slice(8, 24), slice(8, 24), slice(8, 32))
    voxels = masked_voxels_in_region(patch_mask, region, patch_size=8)
    assert tuple(voxels.shape) == (1, 1, 16, 16, 24)
    expected = torch.zeros(16, 16, 24, dtype=torch.bool)
    expected[0:8, 8:16, 16:24] = True
    assert torch.equal(voxels[0, 0], expected)


def test_zero_padding_is_not_masking_in_the_loss_and_the_metric():
    """A zero-padded crop: the padded voxels that no patch masks must not count, whatever their reconstruction.

    An image 16 voxels deep padded to 64 (SpatialPadd, symmetric: depths 0..23 and 40..63 are zeros) and masked
    with mask value 0: inside the region (depths 16..47) the unmasked padding is as 0 in the network's input as the
    masked voxels are, so code that found masked voxels by value == 0 would score the padding too.
    """
    from monai.transforms import SpatialPadd

    from hybridmim_components import HybridMIMLoss
    from hybridmim_components.workflow.pretext_metrics import MaskedReconstructionMSE

    image = torch.rand(1, 16, 64, 64) + 1.0  # strictly positive content: only padding and masking are 0
    data = Compose([SpatialPadd("image", (64, 64, 64)), HierarchicalMaskd("image", mask_ratio=0.4)])
    data.set_random_state(0)
    sample = data({"image": image})
    batch = {k: torch.as_tensor(sample[k]).unsqueeze(0) for k in ("image", "mim_target", "mim_patch_mask",
                                                                  "mim_count", "mim_location")}
    region = (slice(16, 48),) * 3
    padded = torch.zeros(32, 32, 32, dtype=torch.bool)
    padded[:8] = padded[24:] = True  # crop depths 16..23 and 40..47
    masked = masked_voxels_in_region(batch["mim_patch_mask"], region, 16)[0, 0]
    padded_visible = padded & ~masked
    masked_content = masked & ~padded
    # the scenario: padding that is 0 in the input without being masked, and masked content, both in the region
    assert padded_visible.any() and masked_content.any()
    inputs = batch["image"][0, 0][region]
    assert torch.all(inputs[padded_visible] == 0) and torch.all(inputs[masked] == 0)
    assert torch.all(inputs[~padded & ~masked] > 0)

    def scores(reconstruction):
        pred = {"reconstruction": reconstruction, "region_slices": region, "embeddings": None,
                "number_logits": torch.zeros(1, 8, 9), "location_logits": torch.zeros(1, 8, 8)}
        loss = HybridMIMLoss()
        loss(pred, batch)
        metric = MaskedReconstructionMSE()
        metric.update((pred, batch))
        return float(loss.last_terms["reconstruction"]), metric.compute()

    torch.manual_seed(0)
    reconstruction = torch.rand(1, 1, 32, 32, 32)
    loss, mse = scores(reconstruction)
    target = batch["mim_target"][0, 0][region]
    by_hand = float(((reconstruction[0, 0] - target)[masked] ** 2).mean())
    assert math.isclose(loss, by_hand, rel_tol=1e-5) and math.isclose(mse, by_hand, rel_tol=1e-5)
    wrong_padding = reconstruction.clone()
    wrong_padding[0, 0][padded_visible] += 5.0  # far from the padding's 0: would dominate if counted
    assert scores(wrong_padding) == (loss, mse)
    wrong_masked = reconstruction.clone()
    wrong_masked[0, 0][tuple(masked_content.nonzero()[0].tolist())] += 5.0  # one masked voxel of image content
    changed_loss, changed_mse = scores(wrong_masked)
    assert changed_loss > loss and changed_mse > mse
