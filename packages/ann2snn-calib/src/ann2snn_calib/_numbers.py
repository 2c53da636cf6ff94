"""The one number check of ann2snn-calib (SPEC 13.3): numbers.Real / numbers.Integral, never bool.

numpy scalars (``np.float32(0.5)``, ``np.int64(3)``) and 0-dim torch tensors of a real dtype are accepted
like Python numbers; callers check ranges and raise their own message.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = ["as_integral", "as_real"]


def _unwrap(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def as_real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not bool, not complex), else None.

    Examples:
        >>> import numpy as np
        >>> as_real(np.float32(0.5)), as_real(torch.tensor(2)), as_real(True), as_real("1")
        (0.5, 2.0, None, None)
    """
    value = _unwrap(value)
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_integral(value: Any) -> int | None:
    """``value`` as an int if it is an integral number (not bool, not a float), else None.

    Examples:
        >>> import numpy as np
        >>> as_integral(np.int64(3)), as_integral(torch.tensor(4)), as_integral(3.0), as_integral(False)
        (3, 4, None, None)
    """
    value = _unwrap(value)
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral):
        return None
    return int(value)
