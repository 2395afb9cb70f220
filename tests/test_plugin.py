"""A method from outside the package (tests/toy_method.py), added without editing `raysegbg/`:
its settings are checked like any method's. A search over its own setting on Ray Tune (each
trial's worker imports it by the path the config carries) runs in
tests/test_storage_uri.py::test_search_in_object_store; it trains in-process in
tests/test_method_gates.py."""

import pytest

from raysegbg.config import load_config, to_dict
from raysegbg.errors import RaysegbgError

TOY = "tests.toy_method:Toy"


def test_plugin_settings_are_typed_checked_and_saved():
    cfg = load_config(None, [f"method.name={TOY}", "method.toy.ema=0.5"])
    assert cfg.method.params.ema == 0.5 and to_dict(cfg)["method"]["toy"]["ema"] == 0.5
    with pytest.raises(RaysegbgError, match="method.toy.ema must be in"):
        load_config(None, [f"method.name={TOY}", "method.toy.ema=1.5"])
    with pytest.raises(RaysegbgError, match="unknown config key 'method.toy.emma'"):
        load_config(None, [f"method.name={TOY}", "method.toy.emma=0.5"])
    with pytest.raises(RaysegbgError, match="cannot import method"):
        load_config(None, ["method.name=tests.no_such_module:Toy"])
