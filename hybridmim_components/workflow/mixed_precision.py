"""The bundles' ``amp_dtype`` key: which half precision MONAI's engines autocast to when ``amp`` is on.

MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` (1.5 and 1.6) take ``amp_kwargs`` for ``torch.autocast("cuda",
**amp_kwargs)``; without a dtype autocast uses float16 (MONAI's default, kept as the bundles' default). bfloat16 has
float32's exponent range, so it needs no loss scaling, but only Ampere and newer GPUs run it fast.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["AMP_DTYPES", "amp_kwargs"]

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_kwargs(dtype: Any, name: str = "amp_dtype") -> dict:
    """``{"dtype": torch.float16 | torch.bfloat16}`` for the engines' ``amp_kwargs``.

    Args:
        dtype: ``"float16"`` or ``"bfloat16"`` (any case, an optional ``torch.`` prefix) or the torch dtype itself.
        name: the config key, named in the error.

    Raises:
        ValueError: naming ``name``, the value and the accepted ones, for anything else.
    """
    if isinstance(dtype, torch.dtype) and dtype in AMP_DTYPES.values():
        return {"dtype": dtype}
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in AMP_DTYPES:
            return {"dtype": AMP_DTYPES[key]}
    raise ValueError(f"{name} must be one of {sorted(AMP_DTYPES)}, got {dtype!r}.")
