"""`raysegbg config show` lists every config key (the dataclass fields, every method's
`Params`) with a type, a default that reads back as that default, and help text; the README's
reference is exactly the generated one (`python -m raysegbg.config_reference --write`)."""

from __future__ import annotations

import dataclasses

import pytest

from raysegbg import config_reference as ref
from raysegbg.cli import main
from raysegbg.config import Config, load_config, to_dict
from raysegbg.registry import METHODS, params_class


def dataclass_keys() -> set[str]:
    keys = set()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            keys.add(f"{section.name}.{f.name}")
    keys.discard("method.sections")  # the method settings, listed per method
    for name in METHODS:
        keys |= {f"method.{name}.{f.name}" for f in dataclasses.fields(params_class(name))}
    return keys


def test_every_key_is_listed_with_help():
    keys = [k for sec in ref.sections() for k in sec.keys]
    assert sorted(k.key for k in keys) == sorted(dataclass_keys())
    assert [k.key for k in keys if not k.help] == []
    assert {"train.steps_per_epoch", "data.scale_min", "optim.warmup_steps",
            "method.baseline.class_weights", "train.patience"} <= {k.key for k in keys}  # fmt: skip


def test_defaults_read_back_as_the_defaults():
    """Every shown default, given back as `--set key=<shown>`, is the field's default."""
    keys = [k for sec in ref.sections() for k in sec.keys]
    cfg = load_config(None, [f"{k.key}={k.default}" for k in keys])
    values = to_dict(cfg)
    for k in keys:
        node = values
        for part in k.key.split("."):
            node = node[part]
        assert ref.show(node) == k.default, k.key
    assert ref.show((1.0, 2)) == "[1.0, 2]" and ref.type_name(str | None) == "str | null"


def test_readme_reference_is_the_generated_one():
    text = ref.README.read_text(encoding="utf-8")
    assert ref.readme_reference(text) == ref.readme_section(), (
        "README's config reference is stale: run `python -m raysegbg.config_reference --write`"
    )
    assert ref.main([]) == 0


def test_markdown_escapes_pipes_and_tags():
    for line in ref.markdown(ref.sections()).splitlines():
        if line.startswith("| `"):
            assert line.replace("\\|", "").count("|") == 5, line
        outside_code = line.split("`")[::2]
        assert not any("<" in part for part in outside_code), line


def test_config_show_cli(capsys):
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in dataclass_keys())
    assert main(["config", "show", "--method", "rrn", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| `method.rrn.threshold` |" in out and "method.prn" not in out
    assert "| `train.patience` | int | `0` |" in out
    assert main(["config", "show", "--method", "tests.toy_method:Toy"]) == 0
    assert "method.toy.ema" in capsys.readouterr().out
    assert main(["config", "show", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Config)])
def test_every_section_has_a_one_line_description(section):
    (sec,) = [s for s in ref.sections() if s.name == section]
    assert sec.about and "\n" not in sec.about and len(sec.about) < 100
