"""The method registry: one explicit dict from a method's name to where its class and its
settings (`Params`) live.

A leaf module (import paths only, no method code), so the config can check `method.name` and
type a method's settings without importing torch: each method keeps its `Params` in a module
of its own that imports no torch (a config loads in a tenth of a second, the training stack
in seconds). A method outside the package is named by its import path,
`package.module:Class`, and its settings are `Class.Params`: a plug-in needs no edit here, and
Ray workers find it the same way (the config carries the path).
"""

from __future__ import annotations

import importlib
from typing import Any

from raysegbg.errors import RaysegbgError

M = "raysegbg.methods"
METHODS: dict[str, tuple[str, str]] = {  # name -> (method class, its Params)
    "baseline": (f"{M}.baseline.method:Baseline", f"{M}.baseline.params:BaselineParams"),
    "mcibi": (f"{M}.mcibi.method:Mcibi", f"{M}.mcibi.params:McibiParams"),
    "colab": (f"{M}.colab.method:Colab", f"{M}.colab.params:ColabParams"),
    "prn": (f"{M}.prn.method:Prn", f"{M}.prn.params:PrnParams"),
    "rrn": (f"{M}.rrn.method:Rrn", f"{M}.rrn.params:RrnParams"),
    "fbr": (f"{M}.fbr.method:Fbr", f"{M}.fbr.params:FbrParams"),
}


def is_import_path(name: str) -> bool:
    return ":" in name


def section_name(name: str) -> str:
    """The config section of a method (`method.<section>.*`): its registry name, or the
    lower-cased class name of an import path (`tests.toy:Toy` -> `toy`)."""
    return name.rsplit(":", 1)[1].lower() if is_import_path(name) else name


def check_method_name(name: str) -> None:
    if name not in METHODS and not is_import_path(name):
        raise RaysegbgError(
            f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))}, or name a "
            "plug-in by its import path (package.module:Class)"
        )


def method_class(name: str) -> Any:
    """The method's class, imported on first use (`raysegbg --help` stays fast)."""
    check_method_name(name)
    return _load(name if is_import_path(name) else METHODS[name][0], name)


def params_class(name: str) -> type | None:
    """The dataclass of a method's settings (None: it has none), without importing torch
    for a registered method."""
    check_method_name(name)
    if is_import_path(name):
        return getattr(method_class(name), "Params", None)
    return _load(METHODS[name][1], name)


def _load(path: str, name: str) -> Any:
    module, attr = path.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RaysegbgError(
            f"cannot import method '{name}' ({exc}): check the import path and that its "
            "package is installed (on every node, for a cluster)"
        ) from None


def section_names() -> dict[str, str]:
    """Section -> method name, for every registered method."""
    return {section_name(n): n for n in METHODS}
