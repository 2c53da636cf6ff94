"""Constants at t = 0: :func:`td_impulse` and the stateless module :class:`TDImpulse` a converted graph calls."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["TDImpulse", "td_impulse"]


def td_impulse(constant: Any, reference: torch.Tensor) -> torch.Tensor:
    """A constant as a differential sequence: ``constant`` at t = 0, zeros after.

    Adding a constant ``c`` to a differential sequence must add it once: the cumulative sum then
    carries ``+ c`` at every step, which is what the ANN computes on the cumulative input.

    Args:
        constant: A tensor broadcastable against one step ``reference[0]``, or a Python number.
        reference: The ``[T, ...]`` sequence the constant is combined with.

    Returns:
        A ``[T, *constant.shape]`` tensor (with leading singleton dims added so it aligns with
        ``reference``'s trailing dims).

    Raises:
        ValueError: ``constant`` has more dims than one step of ``reference``.
    """
    if not isinstance(constant, torch.Tensor):
        constant = torch.as_tensor(constant, dtype=reference.dtype, device=reference.device)
    extra = reference.dim() - 1 - constant.dim()
    if extra < 0:
        raise ValueError(
            f"A constant of shape {tuple(constant.shape)} cannot be added at t = 0 to a time sequence of shape "
            f"{tuple(reference.shape)}: it has more dims than one time step."
        )
    step = constant.reshape((1,) * extra + tuple(constant.shape))
    steps = reference.shape[0]
    return torch.cat([step.unsqueeze(0), step.new_zeros((steps - 1, *step.shape))], dim=0)


class TDImpulse(nn.Module):
    """A stateless module calling :func:`td_impulse`: how a converted graph adds a constant at t = 0.

    :func:`replace_by_td_operators` emits a ``call_module`` to this module (registered at the root as
    ``td_impulse_<i>``) rather than a ``call_function`` to :func:`td_impulse`: a ``GraphModule`` loaded
    with ``torch.load`` re-traces its code with every module as a leaf, and would otherwise trace into
    :func:`td_impulse` and fail on its shape check.

    Shape:
        - constant: broadcastable against one step ``[*]`` of ``reference`` (or a Python number).
        - reference: ``[T, *]``.
        - Output: ``[T, *constant.shape]``, with leading singleton dims aligning it with ``reference``.

    Examples:
        >>> import torch
        >>> from ann2snn_fx.td import TDImpulse
        >>> TDImpulse()(torch.tensor([1.0, 2.0]), torch.zeros(3, 4, 2))
        tensor([[[1., 2.]],
        <BLANKLINE>
                [[0., 0.]],
        <BLANKLINE>
                [[0., 0.]]])
    """

    def forward(self, constant: Any, reference: torch.Tensor) -> torch.Tensor:
        """``constant`` at t = 0, zeros after (see :func:`td_impulse`)."""
        return td_impulse(constant, reference)
