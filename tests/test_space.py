"""Search-space files: every shipped file validates; every kind of mistake names file, key and choices."""
from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import ROOT

from study.trial.config import ConfigError
from study.search.front.robust_settings import CONFIRM_DEFAULT, ConfirmSettings, is_suite_name
from study.search.optimize.objectives import OBJECTIVE_METRICS
from study.search.optimize.space import load_space, parse_space



def _all_search_space_files() -> list[Path]:
    """search_spaces/*.yaml, plus any other YAML file in the repository shaped like a search space."""
    found = set((ROOT / "search_spaces").glob("*.yaml"))
    skip = {".venv", "runs", ".git", "node_modules", "data", "docs"}  # docs/: generated copies of runs
    for path in ROOT.rglob("*.y*ml"):
        if skip & set(path.relative_to(ROOT).parts) or path in found:
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and {"study", "search"} <= set(data):
            found.add(path)
    return sorted(found)


SPACES = _all_search_space_files()

BASE = {
    "study": {"name": "t", "sampler": "random", "n_trials": 3},
    "trial": {"data": {"name": "digits"}, "model": {"arch": "small_cnn"}},
    "search": {
        "prune.keep_fraction": {"float": [0.01, 0.5], "log": True},
        "prune.score_init": {"choice": ["ssi", "kaiming_normal"]},
        "attack.schedule": {"choice": ["constant", "linear"]},
        "attack.warmup_fraction": {"float": [0.0, 0.5], "when": {"attack.schedule": ["linear"]}},
        "attack.steps": {"int": [1, 10]},
    },
}


def _space(**edits):
    data = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        *parents, leaf = dotted.split("/")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return parse_space(data, "x.yaml")


def _error(**edits) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        _space(**edits)
    return e.value


def test_shipped_files_exist():
    names = {p.name for p in SPACES}
    assert {"quickstart.yaml", "fashion_mnist.yaml", "cifar10_vgg16.yaml", "cifar10_wrn_28_4.yaml", "svhn_vgg16.yaml"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_file_loads_and_samples(path):
    space = load_space(path)
    text = path.read_text()
    header = text.split("\n\n", 1)[0]
    for word in ("command:", "hardware:", "time:"):
        assert word in header, f"{path.name}: header lacks '{word}'"
    assert space.study.name == path.stem
    # selection sees validation only: every objective is a size, a val_* figure or a (validation) suite metric
    for metric in space.study.metrics:
        assert metric in OBJECTIVE_METRICS or is_suite_name(metric), (path.name, metric)
        assert not metric.startswith(("test", "final")) and metric not in ("robust_acc", "clean_acc")
    assert space.study.confirm.autoattack and space.study.confirm.steps >= 20  # the front is confirmed on test
    assert "confirm:" in text
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    if path.parent != ROOT / "search_spaces":  # an experiment's grid file: it loads, samples and confirms on test
        for _ in range(5):
            trial = study.ask()
            space.trial_config(space.suggest(trial))
            study.tell(trial, [1.0, 0.5])
        return
    # A user's search space searches the mission's knobs.
    keys = set(space.keys)
    assert {"prune.keep_fraction", "prune.score_init", "attack.schedule", "attack.warmup_fraction",
            "attack.eps_multiplier", "attack.steps"} <= keys
    keep = next(p for p in space.params if p.key == "prune.keep_fraction")
    assert keep.log and keep.high <= 0.5  # log-scaled near sparsity 1
    # Sampling through Optuna builds a valid TrialConfig every time, conditional params included.
    for _ in range(10):
        trial = study.ask()
        values = space.suggest(trial)
        cfg = space.trial_config(values)
        assert cfg.pretrain_key() == space.base_config().pretrain_key()
        if values["attack.schedule"] == "constant":
            assert "attack.warmup_fraction" not in values
        study.tell(trial, [1.0, 0.5])


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_runs_the_conditional_space(sampler):
    from study.search.optimize.samplers import make_sampler

    space = load_space(ROOT / "search_spaces" / "quickstart.yaml",
                       {"study.sampler": sampler, "study.sampler_options": None})
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=make_sampler(space), storage=storage)
    for i in range(12):
        trial = study.ask()
        values = space.suggest(trial)
        keep = values["prune.keep_fraction"]
        study.tell(trial, [keep * 1000, 0.5 + 0.4 * keep ** 0.5 - 0.01 * values["attack.steps"]])
    assert len(study.best_trials) >= 1
    # a resumed study's sampler (another seed: study.search.optimize.searcher) goes on sampling the same study
    again = optuna.load_study(study_name=study.study_name, storage=storage,
                              sampler=make_sampler(space, seed_offset=len(study.trials)))
    for _ in range(4):
        trial = again.ask()
        space.suggest(trial)
        again.tell(trial, [1.0, 0.5])
    if sampler == "nsga2":  # the generation key keeps the sampler's own name
        assert all("NSGAIISampler:generation" in t.system_attrs for t in study.trials)


def test_conditional_parent_comes_first_and_fallback_is_fixed_value():
    data = copy.deepcopy(BASE)
    data["trial"]["attack"] = {"warmup_fraction": 0.2}
    # the child is listed before its parent in the file
    data["search"] = {"attack.warmup_fraction": data["search"].pop("attack.warmup_fraction"), **data["search"]}
    space = parse_space(data, "x.yaml")
    assert space.keys.index("attack.schedule") < space.keys.index("attack.warmup_fraction")
    assert space.trial_config({"attack.schedule": "constant"}).attack.warmup_fraction == 0.2


@pytest.mark.parametrize("edits, key, words", [
    ({"colour": 1}, "colour", ["valid keys: study, trial, search"]),
    ({"study/nme": "x"}, "study.nme", ["did you mean 'name'"]),
    ({"study/sampler": "cmaes"}, "study.sampler", ["tpe, nsga2, gp, random"]),
    ({"study/n_trials": 0}, "study.n_trials", ["out of range"]),
    ({"study/objectives": [{"metric": "size", "mode": "min"}]}, "study.objectives[0].metric", ["params_kept", "val_robust_acc"]),
    ({"study/objectives": [{"metric": "val_robust_acc", "mode": "up"}]}, "study.objectives[0].mode", ["min, max"]),
    ({"study/objectives": [{"metric": "val_robust", "mode": "max"}]}, "study.objectives[0].metric",
     ["did you mean 'val_robust_acc'"]),
    # objectives select models: no test-split figure may be one, and the error says what to use
    ({"study/objectives": [{"metric": "robust_acc", "mode": "max"}]}, "study.objectives[0].metric",
     ["selection uses validation: did you mean val_robust_acc?"]),
    ({"study/objectives": [{"metric": "params_kept", "mode": "min"}, {"metric": "clean_acc", "mode": "max"}]},
     "study.objectives[1].metric", ["selection uses validation: did you mean val_clean_acc?"]),
    ({"study/objectives": [{"metric": "test_robust_acc", "mode": "max"}]}, "study.objectives[0].metric",
     ["test-split figure", "did you mean val_robust_acc?"]),
    ({"study/objectives": [{"metric": "test_autoattack_acc", "mode": "max"}]}, "study.objectives[0].metric",
     ["did you mean val_robust_acc?"]),
    ({"study/objectives": [{"metric": "test_clean_acc", "mode": "max"}]}, "study.objectives[0].metric",
     ["did you mean val_clean_acc?"]),
    ({"study/objectives": [{"metric": "test.robust.linf.0.1", "mode": "max"}]}, "study.objectives[0].metric",
     ["test-split figure", "did you mean robust.linf.0.1?"]),
    ({"study/objectives": [{"metric": "final.autoattack.linf.0.1", "mode": "max"}]}, "study.objectives[0].metric",
     ["did you mean robust.linf.0.1?"]),
    # the test-split confirmation's settings
    ({"study/gpus_per_trial": 1.5}, "study.gpus_per_trial", ["whole number of GPUs", "1.5"]),
    ({"study/gpus_per_trial": 0.33333}, "study.gpus_per_trial", ["at most 4 decimals"]),
    ({"study/gpus_per_trial": -0.25}, "study.gpus_per_trial", ["auto or a number >= 0"]),
    ({"study/gpus_per_trial": "half"}, "study.gpus_per_trial", ["auto or a number >= 0"]),
    ({"study/confirm": {"restart": 2}}, "study.confirm.restart", ["did you mean 'restarts'", "points, steps"]),
    ({"study/confirm": {"points": -1}}, "study.confirm.points", [">= 0"]),
    ({"study/confirm": {"steps": 0}}, "study.confirm.steps", [">= 1"]),
    ({"study/confirm": {"steps": 2.5}}, "study.confirm.steps", ["integer"]),
    ({"study/confirm": {"autoattack": "yes"}}, "study.confirm.autoattack", ["true or false"]),
    ({"study/confirm": {"steps": 10, "step_size": 0.05}}, "study.confirm.step_size", ["steps * step_size >= 1"]),
    ({"study/confirm": [50, 3]}, "study.confirm", ["mapping", "points, steps, restarts"]),
    ({"study/sampler_options": {"popsize": 4}}, "study.sampler_options.popsize", ["valid keys"]),
    ({"trial/prune": {"keep_frac": 0.1}}, "trial.prune.keep_frac", ["valid keys"]),
    ({"search/prune.keep_frac": {"float": [0.1, 0.2]}}, "search.prune.keep_frac", ["did you mean 'prune.keep_fraction'"]),
    ({"search/pruning.rate": {"float": [0.1, 0.2]}}, "search.pruning.rate", ["valid sections"]),
    ({"search/prune.keep_fraction": {"float": [0.5, 0.1]}}, "search.prune.keep_fraction.float", ["below high"]),
    ({"search/prune.keep_fraction": {"float": [0.0, 0.5], "log": True}}, "search.prune.keep_fraction.float", ["low > 0"]),
    ({"search/prune.keep_fraction": {"float": [0.1, 1.5]}}, "search.prune.keep_fraction.float", ["out of range", "<= 1.0"]),
    ({"search/prune.keep_fraction": {"floats": [0.1, 0.5]}}, "search.prune.keep_fraction.floats", ["float, int, choice"]),
    ({"search/prune.keep_fraction": {"float": [0.1, 0.5], "int": [1, 2]}}, "search.prune.keep_fraction", ["exactly one"]),
    ({"search/prune.score_init": {"choice": ["ssi", "magic"]}}, "search.prune.score_init.choice", ["magic", "kaiming_normal", "snip"]),
    ({"search/attack.schedule": {"choice": ["constant", "zigzag"]}}, "search.attack.schedule.choice", ["cosine", "step"]),
    ({"search/attack.steps": {"float": [1, 10]}}, "search.attack.steps.float", ["int: [lo, hi]"]),
    ({"search/prune.keep_fraction": {"int": [1, 2]}}, "search.prune.keep_fraction.int", ["float"]),
    ({"search/attack.warmup_fraction": {"float": [0, 0.5], "when": {"attack.loss": ["pgd"]}}},
     "search.attack.warmup_fraction.when.attack.loss", ["valid choices", "attack.schedule"]),
    ({"search/attack.warmup_fraction": {"float": [0, 0.5], "when": {"attack.schedule": ["cosine"]}}},
     "search.attack.warmup_fraction.when.attack.schedule", ["constant, linear"]),
    ({"search/pretrain.epochs": {"int": [1, 5]}}, "search.pretrain.epochs.int", ["dense pretrained model"]),
    ({"search/model.width": {"int": [8, 64]}}, "search.model.width.int", ["dense pretrained model"]),
    ({"trial/prune": {"keep_fraction": 0.1}}, "search.prune.keep_fraction", ["both fixed", "searched"]),
    ({"search": {}}, "search", ["no parameter"]),
])
def test_mistakes_name_the_key_and_the_choices(edits, key, words):
    err = _error(**edits)
    assert err.key == key, str(err)
    for w in words:
        assert w in str(err), str(err)


@pytest.mark.parametrize("value", [0, 0.25, 0.5, 1, 2, "auto"])
def test_gpus_per_trial_takes_fractions_and_whole_gpus(value):
    assert _space(**{"study/gpus_per_trial": value}).study.gpus_per_trial == (value if value == "auto" else float(value))


def test_load_space_names_the_file(tmp_path):
    data = copy.deepcopy(BASE)
    data["search"]["prune.score_init"] = {"choice": ["ssi", "nope"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_space(path)
    assert str(e.value).startswith(f"{path}: search.prune.score_init.choice")


def test_overrides_apply_to_the_file():
    path = ROOT / "search_spaces" / "quickstart.yaml"
    space = load_space(path, {"study.n_trials": 2, "trial.finetune.epochs": 1})
    assert space.study.n_trials == 2 and space.base_config().finetune.epochs == 1
    with pytest.raises(ConfigError) as e:
        load_space(path, {"study.n_trial": 2})
    assert e.value.key == "study.n_trial"
    narrow = load_space(path, {"search.prune.keep_fraction.float": [0.01, 0.1],
                               "search.attack.steps": {"choice": [1, 3]}})
    by_key = {p.key: p for p in narrow.params}
    assert (by_key["prune.keep_fraction"].low, by_key["prune.keep_fraction"].high, by_key["prune.keep_fraction"].log) == (0.01, 0.1, True)
    assert by_key["attack.steps"].choices == (1, 3)
    with pytest.raises(ConfigError) as e:
        load_space(path, {"search.prune.score_init.choice": ["ssi", "magic"]})
    assert e.value.key == "search.prune.score_init.choice" and "kaiming_normal" in str(e.value)


def test_default_objectives_and_confirmation():
    space = _space()
    assert space.study.metrics == ["params_kept", "val_robust_acc"] and space.study.modes == ["min", "max"]
    c = space.study.confirm
    assert c == CONFIRM_DEFAULT == ConfirmSettings(points=0, steps=50, restarts=3, step_size=0.0, autoattack=True, seed=0)
    assert c.attack_text(0.1, 360) == ("PGD-50 x3 restarts (step 2.5*eps/50) + standard AutoAttack, Linf eps 0.1, "
                                       "360 test points (the whole test split)")
    custom = _space(**{"study/confirm": {"points": 200, "steps": 20, "restarts": 2, "autoattack": False}}).study.confirm
    assert (custom.points, custom.steps, custom.restarts, custom.autoattack) == (200, 20, 2, False)
    assert custom.attack_text(0.05, 200) == "PGD-20 x2 restarts (step 2.5*eps/20) (no AutoAttack), Linf eps 0.05, 200 test points"
    assert _space(**{"study/confirm": None}).study.confirm == CONFIRM_DEFAULT
    # the quickstart confirms its front too (the default is on for every study)
    quick = load_space(ROOT / "search_spaces" / "quickstart.yaml").study.confirm
    assert quick.autoattack and quick.steps == 50 and quick.restarts == 3
