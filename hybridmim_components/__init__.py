"""HybridMIM components for MONAI bundles: masking, pretraining networks, losses, weight transfer, workflow glue.

Each concern lives in its own module; the names bundles reference by ``_target_`` are re-exported here.
"""
from .flags import config_flag
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
from .transfer import PretrainedWeightsError, extract_state_dict, load_pretrained_weights

__version__ = "0.1.0"
