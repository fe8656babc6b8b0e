"""One registry for all PTQ methods.

A method is one file in ``daptq_ros/quant/methods/`` with a class decorated by
``@register_method("name")``. The class declares ``Options`` (a dataclass of its sub-options,
validated by key name from the recipe's ``method_options.<name>``), ``default_rounding`` and
``apply(ctx) -> dict[layer, LayerSpec]`` (quantizes ``ctx.model`` in place, returns the bit plan).
Every module of the package is imported on first lookup, so a new file needs no other edit.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from daptq_ros.quant.api import QuantContext
    from daptq_ros.quant.fakequant import LayerSpec

_METHODS: dict[str, type[QuantMethod]] = {}
_LOADED = False


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


class QuantMethod(Protocol):
    """What a registered method class provides."""

    name: ClassVar[str]
    Options: ClassVar[type]
    default_rounding: ClassVar[str]
    summary: ClassVar[str]

    def apply(self, ctx: QuantContext) -> dict[str, LayerSpec]: ...


def register_method(name: str):
    """Class decorator registering a PTQ method under ``name``."""

    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"PTQ method {name!r} is registered twice")
        if not dataclasses.is_dataclass(getattr(cls, "Options", None)):
            raise TypeError(f"method {name!r} must define a dataclass `Options`")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import daptq_ros.quant.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    _load_all()
    return sorted(_METHODS)


def get_method(name: str) -> type[QuantMethod]:
    """The method class for ``name``; unknown names raise listing the valid ones."""
    _load_all()
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown PTQ method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_options(name: str, data: dict[str, Any] | None) -> Any:
    """Validated ``Options`` instance of method ``name`` from a plain dict (None -> defaults)."""
    from daptq_ros.config_util import from_dict

    cls = get_method(name).Options
    return from_dict(cls, data or {}, prefix=f"method_options.{name}.")
