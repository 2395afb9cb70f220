"""Search-space YAML -> Optuna define-by-run: sampling, conditions, and every bad-space error.

Plain Optuna, no Ray: these run in well under a second each.
"""

import pickle
from pathlib import Path

import optuna
import pytest
import yaml

from raysegbg.config import Config, load_config
from raysegbg.errors import RaysegbgError
from raysegbg.search_space import SearchSpace, apply_params, load_space, parse_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample_many(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    """`n` trials of a seeded TPE study (a random score each), as Tune would drive it."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    out = []
    for i in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, (i * 7919 % 101) / 101)
    return out


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("name", ["baseline.yaml", "all.yaml", "rrn.yaml", "fbr.yaml"])
def test_shipped_spaces_compile_and_sample_valid_configs(name):
    space = load_space(SPACES / name)
    assert "optim.lr" in space.names
    base = load_config(None)
    for params in sample_many(space, 20):
        low, high = space.param("optim.lr").low, space.param("optim.lr").high
        assert low <= params["optim.lr"] <= high
        cfg = load_config(None, [f"{k}={v}" for k, v in params.items()])
        assert cfg.optim.lr == pytest.approx(params["optim.lr"]) and cfg.data == base.data


def test_all_yaml_samples_only_the_chosen_methods_parameters():
    space = load_space(SPACES / "all.yaml")
    methods = set(space.param("method.name").choices)
    for params in sample_many(space, 60):
        chosen = params["method.name"]
        owners = {n.split(".")[1] for n in params if n.startswith("method.") and n != "method.name"}
        assert owners <= {chosen}, params
        expected = {p.name for p in space.params if p.when == (("method.name", (chosen,)),)}
        assert expected <= set(params)
    assert methods  # every branch names a choice (checked at load)


def test_conditional_branches_each_appear_only_with_their_value():
    space = parse_space(
        {
            "params": {
                "optim.name": {"type": "categorical", "choices": ["adamw", "sgd"]},
                "optim.momentum": {
                    "type": "float", "low": 0.5, "high": 0.99, "when": {"optim.name": "sgd"},
                },
                "optim.weight_decay": {
                    "type": "log_float", "low": 1e-6, "high": 1e-2, "when": {"optim.name": "adamw"},
                },
                "optim.schedule": {
                    "type": "categorical", "choices": ["cosine", "poly"],
                    "when": {"optim.name": ["sgd"]},
                },
                "optim.warmup_steps": {  # nested: only under sgd + poly
                    "type": "int", "low": 0, "high": 20, "step": 5,
                    "when": {"optim.schedule": "poly"},
                },
            }
        }
    )  # fmt: skip
    seen = set()
    for params in sample_many(space, 80, seed=1):
        sgd = params["optim.name"] == "sgd"
        seen.add(params["optim.name"])
        assert ("optim.momentum" in params) == sgd
        assert ("optim.weight_decay" in params) == (not sgd)
        poly = params.get("optim.schedule") == "poly"
        assert ("optim.warmup_steps" in params) == poly
        if poly:
            assert params["optim.warmup_steps"] in (0, 5, 10, 15, 20)
    assert seen == {"adamw", "sgd"}


def test_types_and_ranges_are_respected():
    space = parse_space(
        {
            "params": {
                "train.batch_size": {"type": "int", "low": 4, "high": 64, "log": True},
                "method.baseline.dice_weight": {"type": "float", "low": 0, "high": 1, "step": 0.25},
                "optim.lr": {
                    "type": "log_float",
                    "low": "1e-4",
                    "high": "1e-2",
                },  # YAML 1.1 strings
            }
        }
    )
    for params in sample_many(space, 30):
        assert isinstance(params["train.batch_size"], int) and 4 <= params["train.batch_size"] <= 64
        assert params["method.baseline.dice_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert 1e-4 <= params["optim.lr"] <= 1e-2


def test_space_pickles_for_tune_resume_and_grid_expands():
    space = load_space(SPACES / "baseline.yaml")
    again = pickle.loads(pickle.dumps(space))
    assert again == space and sample_many(again, 3) == sample_many(space, 3)
    grid = parse_space(
        {
            "params": {
                "optim.lr": {"type": "categorical", "choices": [1e-3, 3e-3, 1e-2]},
                "method.baseline.dice_weight": {"type": "categorical", "choices": [0.0, 1.0]},
            }
        }
    ).grid()
    assert len(grid) == 6 and {"optim.lr": 1e-2, "method.baseline.dice_weight": 1.0} in grid
    with pytest.raises(RaysegbgError, match="grid needs categorical"):
        space.grid()


def test_apply_params_sets_dotted_paths_without_touching_the_base():
    base = {"optim": {"lr": 1.0}}
    out = apply_params(base, {"optim.lr": 2.0, "method.baseline.dice_weight": 0.1})
    assert out == {"optim": {"lr": 2.0}, "method": {"baseline": {"dice_weight": 0.1}}}
    assert base == {"optim": {"lr": 1.0}}


LR = {"type": "log_float", "low": 1e-4, "high": 1e-2}
METHOD = {"type": "categorical", "choices": ["baseline"]}
BAD_SPACES = [
    ({"params": {"optim.lr": LR}, "sampler": "tpe"}, "unknown key 'sampler'"),
    ({"parms": {"optim.lr": LR}}, "unknown key 'parms'"),
    ({"params": {}}, "`params:` must map"),
    ({"params": {"optim.lr": {**LR, "lo": 1}}}, "unknown key 'lo' for type log_float"),
    ({"params": {"optim.lr": {"type": "float", "low": 0.1, "high": 0.1}}}, "empty range"),
    (
        {"params": {"optim.lr": {"type": "float", "low": 0.5, "high": 0.1}}},
        "inverted range low=0.5 > high=0.1: swap them",
    ),
    (
        {"params": {"optim.lr": {"type": "log_float", "low": 0, "high": 1}}},
        "log_float needs low > 0",
    ),
    ({"params": {"optim.lr": {"type": "float", "low": "a", "high": 1}}}, "`low` must be a number"),
    (
        {"params": {"optim.lr": {"type": "loguniform", "low": 1, "high": 2}}},
        "unknown type 'loguniform'",
    ),
    ({"params": {"optim.lr": {"low": 1, "high": 2}}}, "needs a mapping with `type:`"),
    ({"params": {"model.arch": {"type": "categorical", "choices": []}}}, "non-empty list"),
    ({"params": {"model.arch": {"type": "categorical", "choices": [[1]]}}}, "numbers, strings"),
    ({"params": {"optim.lrr": LR}}, "unknown config key 'optim.lrr'"),
    ({"params": {"optim": LR}}, "config key 'optim' expects OptimConfig"),
    ({"params": {"train.epochs": {"type": "float", "low": 1, "high": 3}}}, "expects int"),
    ({"params": {"optim.lr": {"type": "float", "low": -1, "high": 1}}}, "optim.lr must be > 0"),
    (
        {"params": {"method.baseline.dice_weight": {**LR, "when": {"method.name": "baseline"}}}},
        "condition on 'method.name', which is not a categorical parameter defined above",
    ),
    (
        {
            "params": {
                "optim.lr": LR,
                "method.name": METHOD,
                "train.epochs": {"type": "int", "low": 1, "high": 3, "when": {"optim.lr": 1}},
            }
        },
        "condition on 'optim.lr'",
    ),  # fmt: skip
    (
        {
            "params": {
                "method.name": METHOD,
                "method.baseline.dice_weight": {**LR, "when": {"method.name": "colab"}},
            }
        },
        "when method.name='colab', but that is not one of its choices",
    ),  # fmt: skip
    (
        {
            "params": {
                "method.name": {"type": "categorical", "choices": ["baseline", "nosuch"]},
                "method.nosuch.k": {
                    "type": "int",
                    "low": 2,
                    "high": 8,
                    "when": {"method.name": "nosuch"},
                },
            }
        },
        "method.name='nosuch' is invalid: unknown method 'nosuch'.*register the method",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("data", "message"), BAD_SPACES)
def test_bad_spaces_fail_with_one_line_naming_the_fix(tmp_path, data, message):
    with pytest.raises(RaysegbgError, match=message) as info:
        load_space(write(tmp_path, data))
    text = str(info.value)
    assert "\n" not in text and text.startswith("search space space.yaml: ")


def test_unreadable_files_fail_with_one_line(tmp_path):
    with pytest.raises(RaysegbgError, match="not found.*search_spaces"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(RaysegbgError, match="not valid YAML"):
        load_space(write(tmp_path, "params: {optim.lr: [\n"))
    with pytest.raises(RaysegbgError, match="must be a mapping"):
        load_space(write(tmp_path, "- 1\n"))


def test_space_is_checked_against_the_base_config(tmp_path):
    """batch sizes that the base's worker count does not divide are caught before a trial."""
    data = {"params": {"train.batch_size": {"type": "int", "low": 3, "high": 8}}}
    load_space(write(tmp_path, data), load_config(None, ["scaling.workers=1"]))
    base = Config()  # two workers: a global batch of 3 cannot be split
    with pytest.raises(RaysegbgError, match="train.batch_size=3 is invalid.*divisible"):
        load_space(write(tmp_path, data), base)


@pytest.mark.parametrize("name", ["baseline", "mcibi", "colab", "prn", "all"])
def test_every_shipped_space_checks_and_its_samples_build_configs(name):
    from raysegbg.config import from_dict, load_config, to_dict
    from raysegbg.search_space import apply_params, check_space

    base = load_config("configs/quickstart.yaml")
    space = load_space(SPACES / f"{name}.yaml", base)
    check_space(space, base)
    for params in sample_many(space, 12):
        cfg = from_dict(apply_params(to_dict(base), params))
        assert cfg.method.name == params.get("method.name", cfg.method.name)
        if "method.prn.patch_sizes" in params:  # a list choice, written as YAML text
            sizes = cfg.method.prn.patch_sizes
            assert isinstance(sizes, tuple) and str(list(sizes)) == params["method.prn.patch_sizes"]
