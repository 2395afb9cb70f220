"""The one error type users see: a one-line message that says how to fix the problem."""


class RaysegbgError(Exception):
    """Bad input or environment, reported as a single line before any Ray work starts."""
