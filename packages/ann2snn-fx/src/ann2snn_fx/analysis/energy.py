"""Energy constants (per operation and per memory access) and the arithmetic that turns counts into joules.

The defaults are the 45 nm, 0.9 V figures of M. Horowitz, "Computing's energy problem (and what we can do
about it)", ISSCC 2014 (doi 10.1109/ISSCC.2014.6757323), the figures most SNN papers quote. They describe
arithmetic only; the memory figure is a stated assumption (one 32-bit SRAM access, 5 pJ, as in Frontiers
PMC8934428), because memory traffic depends on the hardware's data reuse, which no op count knows.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["FP32_45NM", "INT8_45NM", "EnergyModel", "bit_matched_bits"]


def _positive(name: str, value: object, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (picojoules), but got {type(value).__name__} ({value!r})."
        )
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite non-negative number of picojoules, but got {number}.")
    return number


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation and per memory access, in picojoules, at one precision (weights and arithmetic).

    The SNN and both ANN baselines are priced with the same model, so they share the weight precision.

    Args:
        name: Label printed with the figures (e.g. ``"fp32, 45 nm (Horowitz 2014)"``).
        mac_pj: One multiply-accumulate at this precision.
        add_pj: One add (an accumulate, a compare, a subtract) at this precision.
        memory_pj: One memory access (a weight read, a membrane read or write, an activation write) in the
            memory-inclusive variant.

    Examples:
        >>> FP32_45NM.mac_pj, FP32_45NM.add_pj
        (4.6, 0.9)
        >>> EnergyModel("custom", mac_pj=1.0, add_pj=0.1).describe()
        'custom: MAC 1 pJ, add 0.1 pJ, memory access 5 pJ'
    """

    name: str
    mac_pj: float
    add_pj: float
    memory_pj: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, but got {type(self.name).__name__}.")
        for field_name in ("mac_pj", "add_pj", "memory_pj"):
            object.__setattr__(self, field_name, _positive(field_name, getattr(self, field_name)))

    def describe(self) -> str:
        """One line with every constant, printed under each table that uses them."""
        return f"{self.name}: MAC {self.mac_pj:g} pJ, add {self.add_pj:g} pJ, memory access {self.memory_pj:g} pJ"


#: fp32, 45 nm (Horowitz, ISSCC 2014): MAC 4.6 pJ, add 0.9 pJ; memory access 5 pJ (32-bit SRAM).
FP32_45NM = EnergyModel("fp32, 45 nm (Horowitz 2014)", mac_pj=4.6, add_pj=0.9, memory_pj=5.0)
#: int8, 45 nm (Horowitz, ISSCC 2014): MAC 0.23 pJ, add 0.03 pJ; memory access 1.25 pJ (a quarter of 32 bits).
INT8_45NM = EnergyModel("int8, 45 nm (Horowitz 2014)", mac_pj=0.23, add_pj=0.03, memory_pj=1.25)


def bit_matched_bits(time_steps: int) -> int:
    """Activation bits of the quantised ANN that carries what ``T`` binary spikes can: ``ceil(log2(T + 1))``.

    Examples:
        >>> [bit_matched_bits(t) for t in (1, 3, 4, 32)]
        [1, 2, 3, 6]
    """
    if isinstance(time_steps, bool) or not isinstance(time_steps, numbers.Integral) or int(time_steps) < 1:
        raise ValueError(f"time_steps must be a positive integer, but got {time_steps!r}.")
    return max(1, math.ceil(math.log2(int(time_steps) + 1)))
