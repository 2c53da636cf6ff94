"""The number check of ann2snn-fx (SPEC 13.3): numbers.Real / numbers.Integral, never bool.

The same helper as ann2snn-calib's (fx depends on the calib release that has it, for
``ann2snn_calib.NonFiniteError`` too), so the two packages accept exactly the same numbers: numpy
scalars and 0-dim torch tensors like Python numbers. Callers check ranges and raise their own message.

Examples:
    >>> import numpy as np, torch
    >>> as_real(np.float32(0.5)), as_integral(torch.tensor(3)), as_integral(True)
    (0.5, 3, None)
"""

from __future__ import annotations

from ann2snn_calib._numbers import as_integral, as_real

__all__ = ["as_integral", "as_real"]
