"""The one registry of quantization methods: name -> `Method` plugin.

Built-in methods register in `srquant.methods` (one line each); a user or a test registers its own with
`register_method(MyMethod())` and can then run it through the API and the CLI like any other.
"""

from __future__ import annotations

from srquant.errors import SrquantError
from srquant.methods.base import Method

_METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add a method under its `name`; refuses a second method of the same name unless `replace`."""
    if not method.name:
        raise SrquantError(f"{type(method).__name__} has no name")
    if method.name in _METHODS and not replace:
        raise SrquantError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method (tests register throwaway ones)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method of this name; an unknown name lists the known ones."""
    import srquant.methods  # noqa: F401 - registers the built-in methods

    if name not in _METHODS:
        raise SrquantError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    return _METHODS[name]


def method_names() -> list[str]:
    """Names of every registered method, built-ins first."""
    import srquant.methods  # noqa: F401 - registers the built-in methods

    return list(_METHODS)


def preset_names() -> list[str]:
    """Every preset name any registered method has."""
    return sorted({preset for name in method_names() for preset in _METHODS[name].presets})
