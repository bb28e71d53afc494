"""The methods registry: every trainer, the demo, the tracking script, benchmarks and tests look methods up here.

A new method is a module in this package with a config dataclass and a ``DistillationMethod`` subclass, and one
line below (see docs/architecture.md)."""

from __future__ import annotations

from ..errors import StepdistillError
from .agd import AGD
from .base import DistillationMethod
from .dmd2 import DMD2
from .lcm import LCM
from .sid import SiD
from .tscd import TSCD
from .tsm import TSM

METHODS: dict[str, type[DistillationMethod]] = {cls.name: cls for cls in (LCM, TSCD, DMD2, SiD, AGD, TSM)}


def get_method(name: str) -> type[DistillationMethod]:
    """The method class registered as ``name`` (an error naming the known methods otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise StepdistillError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "DistillationMethod", "get_method"]
