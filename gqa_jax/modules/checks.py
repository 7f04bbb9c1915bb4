"""Argument checks shared by the linen layers (errors name the field and its value)."""

from __future__ import annotations

import math
import numbers

import numpy as np


def check_positive_int(name: str, value) -> None:
    """Raises ``ValueError`` unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def check_rate(name: str, value) -> None:
    """Raises ``ValueError`` unless ``value`` is a probability in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {name}={value!r}")


def check_optional_positive_int(name: str, value) -> None:
    """Raises ``ValueError`` unless ``value`` is None or a positive int."""
    if value is not None:
        check_positive_int(name, value)


def check_bool(name: str, value) -> None:
    """Raises ``TypeError`` unless ``value`` is a bool (a string such as ``"no"`` would read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {name}={value!r}")


def check_optional_positive_real(name: str, value) -> None:
    """Raises unless ``value`` is None or a positive finite real (``TypeError`` for other types)."""
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or positive (a real number), got {name}={value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be None or positive and finite, got {name}={value!r}")
