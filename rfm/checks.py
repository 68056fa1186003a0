"""The argument checks every module shares, so a value means the same everywhere (plain Python).

An integer parameter accepts Python and numpy integers and integer-valued floats (a UI slider sends
2.0 for 2) and returns an ``int``; 2.5, NaN and booleans are refused. A fraction parameter such as
the box threshold λ lies strictly between 0 and 1.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None, why: str = "") -> int:
    """``value`` as an int in [minimum, maximum] (either bound optional), or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        allowed = (f"{minimum}..{maximum}" if minimum is not None and maximum is not None
                   else f"≥ {minimum}" if minimum is not None else f"≤ {maximum}")
        raise ValueError(f"{name} must be {allowed}, got {value}" + (f" ({why})" if why else ""))
    return value


def is_count(value) -> bool:
    """Whether ``value`` is a non-negative int, as a file's sizes and offsets must be (a bool is not: a pickle
    or JSON may say True for 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def positive(name: str, value) -> float:
    """A finite number > 0 as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def fraction(name: str, value) -> float:
    """A number strictly between 0 and 1 as a float (0 and 1 make a threshold select everything or nothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return float(value)


def unit_interval(name: str, value) -> float:
    """A number in [0, 1] as a float (a confidence level: 0 turns the filter off)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def choice(name: str, value, options: Sequence, why: str = "") -> None:
    if value not in options:
        listed = " or ".join(map(repr, options)) if len(options) <= 2 else f"one of {', '.join(map(repr, options))}"
        raise ValueError(f"{name} must be {listed}, got {value!r}"
                         + (f" ({why})" if why else ""))
