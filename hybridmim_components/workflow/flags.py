"""True/false config keys that survive the bundle command line.

``python -m monai.bundle run ... --amp false`` hands the bundle the *string* ``'false'`` (python-fire only turns
``False`` into a bool), and ``bool('false')`` is true. The bundles read every on/off key through
:func:`config_flag`, so ``false``/``False``/``0``/``no`` all mean off and a typo stops the run naming the key.
"""
from __future__ import annotations

from typing import Any

__all__ = ["config_flag"]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def config_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: ``True``/``False``, ``1``/``0``, or those words as strings (any case, spaces ignored).

    Raises:
        ValueError: naming ``name`` and the value, for anything else.
    """
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, (bool, int)) and not isinstance(value, float) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}.")
