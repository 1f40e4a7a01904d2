"""The valid values of numeric settings, declared on the field itself
(`lr: Annotated[float, POSITIVE]`, or an alias below such as `PositiveFloat`): each field has
one range, beside its type, its default and its docstring, and loading checks it.

Pure declarations (the config classes import this): importing it must stay cheap.
"""

from __future__ import annotations

import math
from typing import Annotated


class Range:
    """The valid values of a numeric field: `low`/`high` bounds (None = unbounded), each
    inclusive unless `*_open`. Floats must also be finite. (Not a dataclass: every dataclass
    the config module shows is a config class.)"""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"

    def __repr__(self) -> str:
        return f"Range({self})"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def range_of(tp: object) -> Range | None:
    """The range an annotated field type declares (through `X | None` and tuples too)."""
    for arg in (tp, *getattr(tp, "__args__", ())):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, Range):
                return meta
    return None


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
"""A probability or share."""
BELOW_1 = Range(0, 1, high_open=True)
"""A share that must leave something (a dropout of 1 drops all; all held out trains on none)."""
FINITE = Range()
SEED = Range(0, 2**32 - 1)
"""numpy's seeds are unsigned 32-bit."""

PositiveFloat = Annotated[float, POSITIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
Share = Annotated[float, UNIT]
Count = Annotated[int, AT_LEAST_1]
"""A whole number of at least 1 (steps, samples, sizes)."""
NonNegativeInt = Annotated[int, NON_NEGATIVE]
"""A whole number where 0 means none or off."""
Seed = Annotated[int, SEED]
Temperature = NonNegativeFloat
"""Sampling temperature: 0 means greedy (local backends) and is valid for APIs."""
PositiveShare = Annotated[float, Range(0, 1, low_open=True)]
"""A share where 0 would leave nothing (of memory, of probability mass)."""
TopP = PositiveShare
"""A nucleus threshold: 0 would keep no token."""
ShareBelow1 = Annotated[float, BELOW_1]
AdamBeta = ShareBelow1
"""1 would divide by zero in Adam's bias correction."""
