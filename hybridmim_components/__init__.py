"""HybridMIM components for MONAI bundles.

The top level is the paper's method, one module per concern: two-level masking (``masking``), the pretraining
networks (``networks``; ``reconstruction`` for inference) and the five losses (``losses``). Beside it, three
subpackages: :mod:`hybridmim_components.weights` (pretrained weights: transfer, public layouts, provenance, trained
settings, the legacy merging order), :mod:`hybridmim_components.workflow` (the glue a bundle needs around the method:
data, checks, checkpoints, metrics, handlers) and :mod:`hybridmim_components.utils` (plumbing: atomic files,
distributed). The names bundles reference by ``_target_`` or call in ``$`` expressions are re-exported here; old
paths of moved modules keep working with a warning (``moved.py``).
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
from .masking import HierarchicalMask, HierarchicalMaskd, masked_voxels_in_region, patch_mask_to_labels
from .networks import HybridMIMNet, HybridMIMSwinUNETR, HybridMIMUNet
# the weights' names the bundles' configs call (hybridmim_components.load_pretrained_weights, ...): plain re-exports
from .weights.merging import DOWNSAMPLE_CHOICES, LegacyPatchMerging, resolve_downsample
from .weights.trained_settings import TrainedSettingsMismatchError, check_trained_settings
from .weights.transfer import PretrainedWeightsError, extract_state_dict, load_pretrained_weights

# the release version, the one source of it (setup.cfg reads it statically; semantic versioning, CHANGELOG.md)
__version__ = "0.2.0"

# old paths of moved code keep working, with a HybridMIMDeprecationWarning (the table: moved.py)
moved.install()
HybridMIMDeprecationWarning = moved.HybridMIMDeprecationWarning


def __getattr__(name: str):
    """Moved names and modules under their old ``hybridmim_components.<name>`` (``moved.MOVED_NAMES`` /
    ``MOVED_MODULES``); anything else raises ``AttributeError`` as usual."""
    return moved.moved_attribute(__name__, name)
