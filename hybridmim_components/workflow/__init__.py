"""The workflow glue of the HybridMIM bundles: what a MONAI bundle needs around the method.

Datalists and input checks, batch preparation, checkpoints and resume, random states, the non-finite guard, pretext
metrics and baselines, previews, the progress bar and small config helpers; one module per concern (see
``docs/design.md``). Every name a bundle references is re-exported here, so configs read
``hybridmim_components.workflow.<Name>``.
"""
from .checkpoints import (
    BestMetricState,
    CrashSafeCheckpointSaver,
    GradScalerState,
    ResumeFromLatestCheckpoint,
    latest_checkpoint,
    load_pretrain_checkpoint,
)
from .data import load_datalist, partition_for_rank
from .finetune import BratsClassesToLabelMapd, HausdorffDistance95, check_roi_size
from .flags import config_flag
from .intensity import NonInvertibleNormalizeIntensityd
from .input_checks import check_contrastive_batch, check_datalist
from .mixed_precision import amp_kwargs
from .nonfinite import NonFiniteLossError, NonFiniteLossGuard
from .onnx_inference import OnnxNetwork
from .pretext_baselines import LocationAccuracyBaseline, MaskedReconstructionBaseline, NumberAccuracyBaseline
from .pretext_metrics import LocationAccuracy, MaskedReconstructionMSE, NumberAccuracy, lower_is_better
from .pool_store import PoolLoadd, PoolRandCropSamplesd, check_pool_store, pool_store_entries, pool_store_identity
from .pretrain import PrepareMIMBatch, loss_terms_transform
from .previews import MIMPreviewHandler, SaveMIMOutputs
from .progress import TrainProgressBar
from .run_identity import RunIdentity, datalist_identity
from .seeding import RandomStates, ReseedHandler
from .serving import PathSafeSpacingd
