"""Weights in and out of the method's networks: what a set of weights is, where it came from, and how it loads.

- ``transfer``: pretrained weights into a finetuning network, loudly (report, refusal): scope, channel adaptation,
  the merging-order check;
- ``public_weights``: the public checkpoint layouts, recognised from their keys and renamed to MONAI's names;
- ``provenance``: the record of what weights were trained with, written beside them and compared by a finetune;
- ``trained_settings``: a config that builds a network for trained weights compared with their record;
- ``merging``: SwinUNETR's patch merging in MONAI <= 1.4's order, so that weights trained before MONAI 1.5 compute
  as trained (``downsample: merging_legacy``).

Configs name these modules' objects by their full path (``hybridmim_components.weights.provenance.make_record``); the
names a finetune's configs call (``load_pretrained_weights``, ``check_trained_settings``, ``resolve_downsample``, ...)
are also re-exported by the package itself (``hybridmim_components.<Name>``).
"""
# every module imported, so that a config's ``$hybridmim_components.weights.<module>.<name>`` resolves after a plain
# ``import hybridmim_components``
from . import merging, provenance, public_weights, trained_settings, transfer
