"""The methods: one module per method, each implementing `raysegbg.methods.base.Method`.

Which names exist is `raysegbg.registry.METHODS`, the only central edit a new method needs.
"""

from raysegbg.registry import METHODS, check_method_name, method_class

__all__ = ["METHODS", "check_method_name", "method_class"]
