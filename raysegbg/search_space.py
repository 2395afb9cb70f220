"""Search spaces as data: a YAML file compiled to an Optuna define-by-run function.

```yaml
params:                                   # sampled in this order
  optim.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
  method.name: {type: categorical, choices: [baseline]}
  method.baseline.dice_weight: {type: float, low: 0.0, high: 1.0, when: {method.name: baseline}}
```

Parameter names are config paths. `when` makes a parameter exist only while an earlier
categorical parameter has one of the given values, so one file can cover every method. The
whole space is checked against the config dataclasses (every bound and every choice, with the
conditions that enable it) before anything runs. No Ray here: `tune` uses this, tests run it
with plain Optuna.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysegbg.config import Config, from_dict, read_yaml, to_dict
from raysegbg.errors import RaysegbgError

TOP_KEYS = ("params", "description")
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "int": ("low", "high", "step", "log"),
    "float": ("low", "high", "step"),
    "log_float": ("low", "high"),
    "categorical": ("choices",),
}
COMMON_KEYS = ("type", "when")
Scalar = bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One sampled config value, optionally present only under conditions (`when`)."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Scalar, ...] = ()
    when: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Sample through an `optuna.Trial` (or Ray's captor around one)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "log_float":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step)

    def active(self, sampled: dict[str, Any]) -> bool:
        """True when every condition holds for the values sampled so far."""
        return all(sampled.get(name, _MISSING) in values for name, values in self.when)

    def probes(self) -> list[Scalar]:
        """Values that cover what the space can produce: both bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


_MISSING = object()


@dataclass(frozen=True)
class SearchSpace:
    """The compiled space; calling it on an Optuna trial samples the active parameters.

    A module-level frozen dataclass so Ray can pickle it into the searcher's state (resume).
    """

    params: tuple[Param, ...]
    source: str = "<space>"

    def __call__(self, trial: Any) -> None:
        self.sample(trial)  # Ray's OptunaSearch reads the suggested values off the trial

    def sample(self, trial: Any) -> dict[str, Any]:
        sampled: dict[str, Any] = {}
        for param in self.params:
            if param.active(sampled):
                sampled[param.name] = param.suggest(trial)
        return sampled

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the choices (benchmarks compare a search with the full grid)."""
        if any(p.kind != "categorical" or p.when for p in self.params):
            raise RaysegbgError(
                f"search space {self.source}: a grid needs categorical parameters without "
                "`when`: write each parameter as {type: categorical, choices: [...]}"
            )
        combos = itertools.product(*(p.choices for p in self.params))
        return [dict(zip(self.names, combo, strict=True)) for combo in combos]


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read, compile and check a search-space file against `base` (default config if None)."""
    p = Path(path)
    if not p.exists():
        found = sorted(x.name for x in Path("search_spaces").glob("*.yaml"))
        hint = f" (search_spaces/ has {', '.join(found)})" if found else ""
        raise RaysegbgError(f"search space {p} not found: pass an existing YAML file{hint}")
    space = parse_space(read_yaml(p, "search space"), p.name)
    check_space(space, base or Config())
    return space


def parse_space(data: Any, source: str = "<space>") -> SearchSpace:
    """Plain data (a parsed YAML file) -> SearchSpace; every structural error is one line."""
    if not isinstance(data, dict):
        raise _error(source, "must be a mapping with a `params:` section")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise _error(source, f"unknown key '{unknown[0]}': valid keys are {', '.join(TOP_KEYS)}")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise _error(source, "`params:` must map config paths (e.g. optim.lr) to parameters")
    params: list[Param] = []
    for name, spec in raw.items():
        params.append(_parse_param(str(name), spec, params, source))
    return SearchSpace(tuple(params), source)


def _parse_param(name: str, spec: Any, earlier: list[Param], source: str) -> Param:
    where = f"parameter '{name}'"
    if not isinstance(spec, dict) or "type" not in spec:
        raise _error(source, f"{where} needs a mapping with `type:` ({', '.join(TYPE_KEYS)})")
    kind = spec["type"]
    if kind not in TYPE_KEYS:
        raise _error(source, f"{where}: unknown type {kind!r}: use one of {', '.join(TYPE_KEYS)}")
    valid = COMMON_KEYS + TYPE_KEYS[kind]
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise _error(
            source, f"{where}: unknown key '{unknown[0]}' for type {kind}: valid {', '.join(valid)}"
        )
    when = _parse_when(spec.get("when"), where, earlier, source)
    if kind == "categorical":
        choices = _parse_choices(spec.get("choices"), where, source)
        return Param(name, kind, choices=choices, when=when)
    low, high, step, log = _parse_range(spec, kind, where, source)
    return Param(name, kind, low, high, step, log, when=when)


def _parse_range(spec: dict, kind: str, where: str, source: str) -> tuple:
    """(low, high, step, log) of a numeric parameter, checked."""
    low, high = (_number(spec.get(k), k, kind, where, source) for k in ("low", "high"))
    if low == high:
        raise _error(source, f"{where}: empty range (low = high = {low}): widen it")
    if low > high:
        raise _error(source, f"{where}: inverted range low={low} > high={high}: swap them")
    if kind == "log_float" and low <= 0:
        raise _error(source, f"{where}: log_float needs low > 0 (got {low}): use type float")
    step = spec.get("step")
    if step is not None:
        step = _number(step, "step", kind, where, source)
        if step <= 0 or step > high - low:
            raise _error(source, f"{where}: step {step} must be > 0 and <= high - low")
    step = 1 if kind == "int" and step is None else step
    log = spec.get("log", False)
    if not isinstance(log, bool) or (log and (low <= 0 or step != 1)):
        raise _error(source, f"{where}: `log: true` needs low > 0 and no step")
    return low, high, step, log


def _number(value: Any, key: str, kind: str, where: str, source: str) -> int | float:
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    if ok and not math.isfinite(value):
        raise _error(source, f"{where}: `{key}` is {value}: use a finite number")
    if not ok:
        kind_word = "an integer" if kind == "int" else "a number"
        raise _error(source, f"{where}: `{key}` must be {kind_word}, got {value!r}")
    return value


def _parse_choices(choices: Any, where: str, source: str) -> tuple[Scalar, ...]:
    if not isinstance(choices, list) or not choices:
        raise _error(source, f"{where}: `choices` must be a non-empty list")
    if not all(isinstance(c, (bool, int, float, str)) for c in choices):
        raise _error(source, f"{where}: choices must be numbers, strings or booleans")
    if len(set(map(repr, choices))) != len(choices):
        raise _error(source, f"{where}: choices repeat a value: list each once")
    return tuple(choices)


def _parse_when(when: Any, where: str, earlier: list[Param], source: str) -> tuple:
    """`{param: value}` or `{param: [values]}`; the param must be an earlier categorical."""
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        example = "{method.name: baseline}"
        raise _error(source, f"{where}: `when` must map a parameter to values, e.g. {example}")
    by_name = {p.name: p for p in earlier}
    return tuple(
        _condition(name, values, by_name.get(name), where, source) for name, values in when.items()
    )


def _condition(name: str, values: Any, parent: Param | None, where: str, source: str) -> tuple:
    if parent is None or parent.kind != "categorical":
        message = f"condition on '{name}', which is not a categorical parameter defined above it"
        raise _error(source, f"{where}: {message}: define that parameter first (order matters)")
    values = tuple(values) if isinstance(values, list) else (values,)
    missing = [v for v in values if v not in parent.choices]
    if missing:
        choices = ", ".join(map(str, parent.choices))
        message = f"when {name}={missing[0]!r}, but that is not one of its choices ({choices})"
        raise _error(source, f"{where}: {message}: add it there or drop the branch")
    return name, values


def check_space(space: SearchSpace, base: Config) -> None:
    """Every bound and every choice, with the conditions that enable it, must give a valid
    Config; otherwise one line names the parameter and the fix. Runs before Ray starts."""
    for name, value, cfg_or_error in probe_configs(space, base):
        if isinstance(cfg_or_error, RaysegbgError):
            hint = (
                "register the method in raysegbg/registry.py (or name it by its import "
                "path), or remove its branch"
            )
            if name != "method.name":
                hint = "fix the path (a config key) or the range/choices"
            raise _error(space.source, f"{name}={value!r} is invalid: {cfg_or_error}; {hint}")


def probe_configs(space: SearchSpace, base: Config) -> list[tuple[str, Any, Any]]:
    """(parameter, value, Config or the RaysegbgError it raised) for every probe value."""
    out = []
    base_values = to_dict(base)
    for param in space.params:
        enabling = _enabling_values(space, param)
        for value in param.probes():
            try:
                cfg: Any = from_dict(apply_params(base_values, {**enabling, param.name: value}))
            except RaysegbgError as exc:
                cfg = exc
            out.append((param.name, value, cfg))
    return out


def _enabling_values(space: SearchSpace, param: Param) -> dict[str, Any]:
    """Values of the parameters `param` depends on (recursively) that make it active."""
    values: dict[str, Any] = {}
    for name, allowed in param.when:
        values.update(_enabling_values(space, space.param(name)))
        values[name] = allowed[0]
    return values


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict `base` with dotted-path values set (`optim.lr` -> lr)."""
    values = copy.deepcopy(base)
    for path, value in params.items():
        node = values
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RaysegbgError(f"'{path}': '{part}' is a value, not a config section")
        node[leaf] = value
    return values


def _error(source: str, message: str) -> RaysegbgError:
    return RaysegbgError(f"search space {source}: {message}")
