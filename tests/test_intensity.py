"""``NonInvertibleNormalizeIntensityd``: the BraTS bundles' z-score, which ``Invertd`` of a prediction leaves alone.

On the next MONAI (``monai-weekly`` 1.7.dev, PR #8905) MONAI's ``NormalizeIntensityd`` is invertible, and the BraTS
bundles' ``Invertd`` turned sigmoid probabilities into de-normalised intensities (0.12 became up to 560). In process,
on tiny synthetic BraTS cases; CI runs this file on MONAI 1.5, 1.6 and the weekly.
"""
from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Activationsd, Invertd, NormalizeIntensityd

from hybridmim_components.workflow import NonInvertibleNormalizeIntensityd

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "bundles", "hybridmim_unet_brats", "configs")


def _mri(seed: int = 0) -> MetaTensor:
    """Two channels ``(2, 6, 7, 5)``: positive intensities inside a box, 0 outside (a brain on its background)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(2, 6, 7, 5)
    x[:, 1:5, 2:6, 1:4] = 100.0 + 30.0 * torch.rand(2, 4, 4, 3, generator=g)
    return MetaTensor(x, affine=torch.eye(4))


def test_same_values_as_monai_normalize_intensityd_and_nothing_recorded():
    kwargs = dict(nonzero=True, channel_wise=True)
    ours = NonInvertibleNormalizeIntensityd(keys="image", **kwargs)({"image": _mri()})["image"]
    monais = NormalizeIntensityd(keys="image", **kwargs)({"image": _mri()})["image"]
    torch.testing.assert_close(ours.as_tensor(), monais.as_tensor())
    inside = ours[:, 1:5, 2:6, 1:4]
    torch.testing.assert_close(inside.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)  # z-scored per channel
    assert ours.applied_operations == [], [op["class"] for op in ours.applied_operations]
    assert not hasattr(NonInvertibleNormalizeIntensityd, "inverse")


@pytest.mark.parametrize(
    "configs,section,split",
    [(["inference.json"], "preprocessing", "testing"), (["train.json", "evaluate.json"], "validate#preprocessing",
                                                         "validation")],
    ids=["inference", "evaluate"],
)
def test_inverting_the_brats_preprocessing_leaves_the_probabilities_alone(configs, section, split, tmp_path):
    """The bundles' own ``Invertd`` step on a constant probability: the input grid back, the values unchanged."""
    from tools.data.make_demo_data import make_brats_dataset

    datalist = make_brats_dataset(str(tmp_path), shape=(24, 24, 24), n_train=1, n_val=1, n_test=1)
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, c) for c in configs])
    parser.update({"dataset_dir": os.path.dirname(datalist), "data_list_file_path": os.path.basename(datalist)})
    preprocessing = parser.get_parsed_content(section)
    entry = ConfigParser.load_config_file(datalist)[split][0]
    entry = {k: ([os.path.join(tmp_path, p) for p in v] if isinstance(v, list) else os.path.join(tmp_path, v))
             for k, v in entry.items()}
    data = preprocessing(entry)
    image = data["image"]
    logit = -2.0
    data["pred"] = MetaTensor(torch.full((3, *image.shape[1:]), logit), meta=image.meta,
                              applied_operations=image.applied_operations)
    data = Activationsd(keys="pred", sigmoid=True)(data)
    out = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)(data)
    pred = out["pred"]
    assert tuple(pred.shape[1:]) == (24, 24, 24), pred.shape  # the input grid
    inside = pred.as_tensor()[pred.as_tensor() > 0]  # padding outside the crop is 0
    expected = torch.sigmoid(torch.tensor(logit))
    assert inside.numel() > 0
    torch.testing.assert_close(inside, torch.full_like(inside, expected.item()), atol=1e-5, rtol=0,
                               msg=lambda m: f"Invertd changed the probabilities (max {inside.max():.3f}): {m}")
