"""The method registry: one explicit dict from method name to its class."""

from __future__ import annotations

from raysegbg.errors import RaysegbgError

METHODS: dict[str, str] = {
    "baseline": "raysegbg.methods.baseline:Baseline",
    "mcibi": "raysegbg.methods.mcibi:Mcibi",
    "colab": "raysegbg.methods.colab:Colab",
    "prn": "raysegbg.methods.prn:Prn",
}


def check_method_name(name: str) -> None:
    if name not in METHODS:
        raise RaysegbgError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))}")


def method_class(name: str) -> type:
    """Import lazily so `raysegbg --help` and config checks stay fast."""
    import importlib

    check_method_name(name)
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)
