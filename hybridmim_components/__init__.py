"""HybridMIM components for MONAI bundles.

The method lives here, one module per concern: two-level masking (``masking``), the pretraining networks
(``networks``; ``reconstruction`` for inference), the five losses (``losses``) and pretrained-weight transfer
(``transfer``); the method's names bundles reference by ``_target_`` are re-exported here. The glue a bundle needs
around it (data, checks, checkpoints, metrics, handlers) is :mod:`hybridmim_components.workflow`.
"""
from . import moved
from .losses import (
    DropoutContrastiveLoss,
    HybridMIMLoss,
    MaskConsistencyLoss,
    MaskLocationLoss,
    MaskNumberLoss,
    PartialRegionReconstructionLoss,
)
from .merging import DOWNSAMPLE_CHOICES, LegacyPatchMerging, resolve_downsample
from .masking import HierarchicalMask, HierarchicalMaskd, masked_voxels_in_region, patch_mask_to_labels
from .networks import HybridMIMNet, HybridMIMSwinUNETR, HybridMIMUNet
from .trained_settings import TrainedSettingsMismatchError, check_trained_settings
from .transfer import PretrainedWeightsError, extract_state_dict, load_pretrained_weights

# the release version, the one source of it (setup.cfg reads it statically; semantic versioning, CHANGELOG.md)
__version__ = "0.2.0"

# old paths of moved code keep working, with a HybridMIMDeprecationWarning (the table: moved.py)
moved.install()
HybridMIMDeprecationWarning = moved.HybridMIMDeprecationWarning


def __getattr__(name: str):
    """Moved names and modules under their old ``hybridmim_components.<name>`` (``moved.MOVED_NAMES`` /
    ``MOVED_MODULES``); anything else raises ``AttributeError`` as usual."""
    return moved.moved_attribute(__name__, name)
