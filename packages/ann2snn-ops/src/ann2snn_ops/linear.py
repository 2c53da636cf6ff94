"""TD affine layers: ``TDLinear`` and ``TDConv2d``.

An affine map ``A x + b`` needs no accumulation: ``diff(A cumsum(x) + b)[t] = A x[t] + b [t == 0]``. The
weight is applied to every step in one kernel call on the folded ``[T*B, ...]`` tensor and the bias is added
to step 0 only, so the cost is that of the plain layer.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_ops._base import TDModule
from ann2snn_ops._checks import check_step, check_time_sequence, copy_module_state, reject_lazy

__all__ = ["TDConv2d", "TDLinear"]


def _check_positive_int(value: object, name: str, owner: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, but got {value!r} ({type(value).__name__}).")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{owner}: {name} must be {bound}, but got {value}.")
    return value


def _add_bias_at_first_step(
    y: torch.Tensor, bias: torch.Tensor | None, view: tuple[int, ...]
) -> torch.Tensor:
    if bias is not None:
        y[0].add_(bias.view(view))  # the linear kernels do not save their output, so in place is safe
    return y


class TDLinear(TDModule):
    """Temporal-difference Linear: ``Y.cumsum(0)[t] == F.linear(X.cumsum(0)[t], weight, bias)``.

    A plain ``nn.Linear`` on differential data would count the bias ``T`` times; this layer counts it once.
    It computes ``Y[t] = X[t] W^T`` in one call and adds ``bias`` to ``Y[0]`` only, which equals the
    cumulate-apply-difference formula without its cost. Parameters and initialisation are those of
    ``nn.Linear``.

    Args:
        in_features: Size of each input step's last dimension.
        out_features: Size of each output step's last dimension.
        bias: Whether to learn an additive bias.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``[T, *, in_features]``, at least 2-D (one step ``[*, in_features]`` in streaming mode).
        - Output: ``[T, *, out_features]``.

    Examples:
        >>> op = TDLinear(3, 5)
        >>> x = torch.randn(4, 2, 3)
        >>> ref = F.linear(x.cumsum(0), op.weight, op.bias)
        >>> torch.allclose(op(x).cumsum(0), ref, atol=1e-5)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int(in_features, "in_features", "TDLinear", allow_zero=True)
        self.out_features = _check_positive_int(out_features, "out_features", "TDLinear", allow_zero=True)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear``: Kaiming-uniform weight (a=√5), bias ~ U(-1/√fan_in, 1/√fan_in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(cls, module: nn.Linear) -> TDLinear:
        """Build from an ``nn.Linear``: copies the parameters (values, dtype, device, ``requires_grad``) and
        the training flag.

        Raises:
            TypeError: If ``module`` is not an ``nn.Linear``.
            ValueError: If ``module`` is a lazy module that has not been initialised.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"TDLinear.from_module expects an nn.Linear, but got {type(module).__name__}.")
        reject_lazy(module, "TDLinear")
        td = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        copy_module_state(module, td, ("weight", "bias"))
        return td

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply TD Linear to ``x_seq`` ``[T, ..., in_features]`` (or one step in streaming mode).

        A wrong last dimension raises torch's own RuntimeError.
        """
        if self.streaming:
            check_step(x_seq, "TDLinear")
            first = not self._state
            self._check_stream_shapes(input=x_seq.shape)
            y = F.linear(x_seq, self.weight)
            if self.bias is not None and first:
                y = y + self.bias
            return y
        check_time_sequence(x_seq, "TDLinear")
        return _add_bias_at_first_step(F.linear(x_seq, self.weight), self.bias, (-1,))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"TDConv2d: {name} must be an int or a pair of ints, but got {value!r}.")


class TDConv2d(TDModule):
    """Temporal-difference Conv2d: ``Y.cumsum(0)[t] == conv2d(X.cumsum(0)[t])``, the bias counted once.

    Arguments, parameters (``weight``, ``bias``) and initialisation are those of ``nn.Conv2d``, including
    string paddings (``"same"``, ``"valid"``), every padding mode (all are linear in the input) and groups.
    The time axis is folded into the batch so the convolution runs once on ``[T*N, C, H, W]``.

    Args:
        in_channels: Channels of each input step.
        out_channels: Channels of each output step.
        kernel_size: Size of the kernel.
        stride: Stride of the convolution.
        padding: Padding added to all four sides, or ``"same"`` / ``"valid"``.
        dilation: Spacing between kernel elements.
        groups: Number of blocked connections from input to output channels.
        bias: Whether to learn an additive bias.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``[T, N, C_in, H, W]`` or ``[T, C_in, H, W]`` (one step ``[N, C_in, H, W]`` or
          ``[C_in, H, W]`` in streaming mode).
        - Output: ``[T, N, C_out, H_out, W_out]`` or ``[T, C_out, H_out, W_out]``.

    Examples:
        >>> op = TDConv2d(2, 4, 3, padding=1)
        >>> x = torch.randn(3, 1, 2, 5, 5)
        >>> ref = F.conv2d(x.cumsum(0).flatten(0, 1), op.weight, op.bias, padding=1).unflatten(0, (3, 1))
        >>> torch.allclose(op(x).cumsum(0), ref, atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "TDConv2d"
        self.in_channels = _check_positive_int(in_channels, "in_channels", owner)
        self.out_channels = _check_positive_int(out_channels, "out_channels", owner)
        self.groups = _check_positive_int(groups, "groups", owner)
        if in_channels % groups != 0:
            raise ValueError(
                f"TDConv2d: in_channels must be divisible by groups, but got {in_channels} and {groups}."
            )
        if out_channels % groups != 0:
            raise ValueError(
                f"TDConv2d: out_channels must be divisible by groups, but got {out_channels} and {groups}."
            )
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        for name, pair in (
            ("kernel_size", self.kernel_size),
            ("stride", self.stride),
            ("dilation", self.dilation),
        ):
            if min(pair) <= 0:
                raise ValueError(f"TDConv2d: {name} must be positive, but got {pair}.")
        self.padding: tuple[int, int] | str
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"TDConv2d: padding must be 'same', 'valid' or ints, but got {padding!r}.")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("TDConv2d: padding='same' is not supported for strided convolutions.")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"TDConv2d: padding must be non-negative, but got {self.padding}.")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                "TDConv2d: padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', "
                f"but got {padding_mode!r}."
            )
        self.padding_mode = padding_mode
        self._explicit_pad = self._reversed_padding()
        self.weight = nn.Parameter(
            torch.empty((out_channels, in_channels // groups, *self.kernel_size), device=device, dtype=dtype)
        )
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _reversed_padding(self) -> tuple[int, int, int, int]:
        """``F.pad`` amounts (left, right, top, bottom) used for non-zero padding modes."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads: list[int] = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return (pads[0], pads[1], pads[2], pads[3])
        ph, pw = cast(tuple[int, int], self.padding)
        return (pw, pw, ph, ph)

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Conv2d``: Kaiming-uniform weight (a=√5), bias ~ U(-1/√fan_in, 1/√fan_in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(cls, module: nn.Conv2d) -> TDConv2d:
        """Build from an ``nn.Conv2d``: copies the configuration, the parameters (values, dtype, device,
        ``requires_grad``) and the training flag.

        Raises:
            TypeError: If ``module`` is not an ``nn.Conv2d``.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"TDConv2d.from_module expects an nn.Conv2d, but got {type(module).__name__}.")
        reject_lazy(module, "TDConv2d")
        td = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,  # type: ignore[arg-type]
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        copy_module_state(module, td, ("weight", "bias"))
        return td

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Bias-free convolution of a 4-D batch (or 3-D unbatched) tensor."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_pad, mode=self.padding_mode)
            return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply TD Conv2d to ``x_seq`` ``[T, N, C, H, W]`` or ``[T, C, H, W]`` (or one step in streaming mode)."""
        if self.streaming:
            check_step(x_seq, "TDConv2d")
            if x_seq.dim() not in (3, 4):
                raise ValueError(
                    "TDConv2d in streaming mode expects one step with shape [N, C, H, W] or [C, H, W], "
                    f"but got shape {tuple(x_seq.shape)}."
                )
            first = not self._state
            self._check_stream_shapes(input=x_seq.shape)
            y = self._conv(x_seq)
            if self.bias is not None and first:
                y = y + self.bias.view(-1, 1, 1)
            return y
        check_time_sequence(x_seq, "TDConv2d")
        if x_seq.dim() == 4:  # [T, C, H, W]: the time axis is the batch of an unbatched conv
            return _add_bias_at_first_step(self._conv(x_seq), self.bias, (-1, 1, 1))
        if x_seq.dim() != 5:
            raise ValueError(
                "TDConv2d expects an input sequence with shape [T, N, C, H, W] or [T, C, H, W], "
                f"but got shape {tuple(x_seq.shape)}."
            )
        t, n = x_seq.shape[:2]
        y = self._conv(x_seq.flatten(0, 1)).unflatten(0, (t, n))
        return _add_bias_at_first_step(y, self.bias, (-1, 1, 1))

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s
