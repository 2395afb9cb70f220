"""The method registry: one explicit dict from a method's name to where its class lives.

A leaf module (names only, no method code), so the config can check `method.name` and find
a method's parameter types without importing the training stack. A method outside the
package is named by its import path, `package.module:Class`: a plug-in needs no edit here,
and Ray workers find it the same way (the config carries the path).
"""

from __future__ import annotations

import importlib
from typing import Any

from raysegbg.errors import RaysegbgError

METHODS: dict[str, str] = {
    "baseline": "raysegbg.methods.baseline:Baseline",
    "mcibi": "raysegbg.methods.mcibi:Mcibi",
    "colab": "raysegbg.methods.colab:Colab",
    "prn": "raysegbg.methods.prn:Prn",
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
    module, attr = (name if is_import_path(name) else METHODS[name]).split(":")
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
