"""Search-space files: strict loading, validation, and the Optuna define-by-run space.

A search-space file is one runnable study (see search_spaces/*.yaml and the README):

    study:  settings of the search (name, sampler, trial count, concurrency, objectives, ...)
    trial:  fixed TrialConfig values (a nested mapping, as in a trial config file)
    search: dotted TrialConfig key -> {float: [lo, hi]} | {int: [lo, hi]} | {choice: [...]},
            optionally with `log: true`, `step: s` and `when: {other.key: [values]}` (conditional)

Everything is checked before anything starts: unknown keys, bad ranges, unknown choices (registry
names included), searched keys that would change the dense pretrained model (it is trained once per
study), and conditions that name no searched choice. The `study:` section is built like a trial config
(study.trial.config.build: field metadata, "did you mean"); the objectives are
study.search.optimize.objectives. Errors are `ConfigError`s naming the file, the dotted key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from study.errors import ConfigError, did_you_mean, unknown_key
from study.search.front.robust_settings import (CONFIRM_DEFAULT, BaselineSettings, ConfirmSettings,
                                                RobustnessSettings, check_confirm, parse_baselines, parse_confirm)
from study.search.optimize import samplers
from study.search.optimize.objectives import DEFAULT_OBJECTIVES, Objective, check_suite_objectives, parse_objectives
from study.search.optimize.rungs import RungRule, parse_rungs
from study.search.optimize.stratify import resolve_stratify
from study.trial.config import TrialConfig, build, in_range, merge, read_yaml, trial_from_dict, unflatten
from study.trial.strict_yaml import refuse_non_finite

TOP_KEYS = ("study", "trial", "search")
PARAM_KEYS = ("float", "int", "choice", "log", "step", "when")


def _study_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_." for c in value) \
            or value.startswith("."):
        raise ConfigError(key, f"expected a name of letters, digits, '-', '_' or '.', got {value!r}")
    return value


def _sampler_options(value: Any, key: str) -> dict:
    value = {} if value is None else value  # `--set study.sampler_options=null` clears them
    if not isinstance(value, Mapping):
        raise ConfigError(key, "expected a mapping of sampler keyword arguments")
    for k, v in value.items():
        if not isinstance(v, (bool, int, float, str)) and v is not None:
            raise ConfigError(f"{key}.{k}", f"expected a number, string or boolean, got {v!r}")
    return dict(value)


def _gpus(value: Any, key: str) -> str | float:
    """auto, 0, a fraction of one GPU (0.25: four trials share a GPU; Ray's resolution is 1e-4), or whole GPUs."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(key, f"expected auto or a number >= 0, got {value!r}")
    if value > 1 and value != int(value):
        raise ConfigError(key, f"expected a fraction of one GPU (0 < x <= 1) or a whole number of GPUs, got {value!r}: "
                               "Ray cannot give a trial 1.5 GPUs")
    if 0 < value < 1 and round(value, 4) != value:
        raise ConfigError(key, f"expected a fraction with at most 4 decimals (Ray's resolution), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class StudySettings:
    # names the folder runs/<name>, the Optuna study and the MLflow experiment
    name: str = field(default="study", metadata={"parse": _study_name})
    sampler: str = field(default="tpe", metadata={"choices": "study.search.optimize.samplers:SAMPLERS"})
    # keyword arguments of the Optuna sampler (checked against its signature)
    sampler_options: dict = field(default_factory=dict, metadata={"parse": _sampler_options})
    n_trials: int = field(default=8, metadata=in_range(1))  # trials in total (COMPLETE + FAIL), across resumes
    max_concurrent: int = field(default=1, metadata=in_range(1))  # trials running at once
    time_budget_s: float = field(default=0.0, metadata=in_range(0.0))  # wall-clock budget of the search; 0 = none
    # auto = 1 where the cluster has GPUs; 0.25 = four trials share one GPU (small models); 2 = two whole GPUs
    gpus_per_trial: str | float = field(default="auto", metadata={"parse": _gpus})
    cpus_per_trial: float = field(default=1.0, metadata=in_range(0.0, lo_open=True))  # also torch's thread count
    # on a joined cluster, how long the driver waits for the autoscaler to add nodes that fit one trial (it
    # asks for them: ray.autoscaler.sdk.request_resources); a GPU node with its image pull takes many minutes
    autoscaler_wait_s: float = field(default=900.0, metadata=in_range(0.0))
    max_failures: int = field(default=3, metadata=in_range(0))  # Tune reruns of a trial whose worker process died
    # a trial's resume checkpoint at the first epoch end this many seconds after its previous one (or its
    # start); 0 = every epoch. A killed trial loses at most this much training (plus an epoch)
    checkpoint_every_s: float = field(default=60.0, metadata=in_range(0.0))
    seed: int = field(default=0, metadata=in_range(0))  # sampler seed
    storage: str = ""  # Optuna storage URL or journal file; "" = sqlite:///runs/<name>/optuna.db
    objectives: tuple[Objective, ...] = field(default=DEFAULT_OBJECTIVES, metadata={"parse": parse_objectives})
    robustness: RobustnessSettings | None = None  # the robustness suite per trial (search) and on the front (final)
    # test-split confirmation of every Pareto-front trial (always)
    confirm: ConfirmSettings = field(default=CONFIRM_DEFAULT, metadata={"parse": parse_confirm})
    # the LWM baseline at the front's sizes, validated and confirmed on test after the front (None = off)
    baselines: BaselineSettings | None = field(default=None, metadata={"parse": parse_baselines})
    # multi-fidelity: stop a trial at a rung (epoch count) when enough completed trials dominate its objectives
    # at that epoch (study.search.optimize.rungs); it is PRUNED, never in the front. None/false = every trial
    # runs in full
    early_stop: RungRule | None = field(default=None, metadata={"parse": parse_rungs})
    # a searched number on a low-discrepancy grid, not the sampler's (study.search.optimize.stratify); "auto":
    # prune.keep_fraction where searched so (the search benchmark's winner, docs/results.md); "": off
    stratify: str = "auto"

    def __post_init__(self) -> None:
        # suite objectives take the suite's spelling (robust.l2.1.0 -> robust.l2.1) and need their section
        object.__setattr__(self, "objectives", check_suite_objectives(self.objectives, self.robustness))
        if self.baselines is not None:  # the baselines' confirmation is study.confirm with some keys changed
            check_confirm(self.baselines.confirm_settings(self.confirm), "baselines.confirm")
        if self.sampler_options:
            valid = samplers.option_names(self.sampler)
            for key in self.sampler_options:
                if key not in valid:
                    raise ConfigError(f"sampler_options.{key}", f"not an option of the {self.sampler} sampler"
                                      f"{did_you_mean(key, valid)}; valid keys: {', '.join(valid) or '(none)'}")

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]


@dataclass(frozen=True)
class Param:
    key: str  # dotted TrialConfig key, also the Optuna parameter name
    kind: str  # "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()  # (parent key, allowed parent values): all must hold

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(parent in values and values[parent] in allowed for parent, allowed in self.when)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            text = "{" + ", ".join(map(str, self.choices)) + "}"
        else:
            text = f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "") + (f" step {self.step:g}" if self.step else "")
        if self.when:
            text += " when " + " and ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in self.when)
        return f"{self.key}: {self.kind} {text}"


@dataclass(frozen=True)
class SearchSpace:
    path: str  # the file it came from (logged as an MLflow artifact)
    study: StudySettings
    trial: dict  # the fixed `trial:` mapping (nested)
    params: tuple[Param, ...]  # in define-by-run order: parents before conditional children
    raw: dict = field(default_factory=dict, repr=False)  # the validated mapping (written beside the study)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Define-by-run space for Optuna: suggests every active parameter, parents first."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.key] = p.suggest(trial)
        return values

    def trial_config(self, values: Mapping[str, Any], fixed: Mapping[str, Any] | None = None) -> TrialConfig:
        """The TrialConfig of one trial: the `trial:` values, dotted `fixed` ones (paths), the searched ones."""
        return trial_from_dict(self.trial, {**(fixed or {}), **values})

    def base_config(self) -> TrialConfig:
        return trial_from_dict(self.trial)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]


# ---------------------------------------------------------------------------------------------------
# Loading and validation.


def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search-space file; every mistake is a ConfigError naming file and key.

    `overrides` are dotted keys of the file itself (`study.n_trials`, `trial.finetune.epochs`,
    `search.prune.keep_fraction.float`, or a whole `search.prune.keep_fraction` spec).
    """
    data = read_yaml(path)
    refuse_non_finite(dict(overrides or {}))
    try:
        if overrides:
            data = _apply_overrides(data, overrides)
        return parse_space(data, str(path))
    except ConfigError as e:
        raise e.with_source(path) from None


def _apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Search keys are dotted themselves: `search.<key>.<float|int|choice|log|step|when>` edits one
    field of a parameter, `search.<key>` replaces (or adds) the whole spec."""
    plain = {k: v for k, v in overrides.items() if not k.startswith("search.")}
    out = merge(data, unflatten(plain))
    search = dict(out.get("search") or {})
    for key, value in overrides.items():
        if not key.startswith("search."):
            continue
        param, _, last = key[len("search."):].rpartition(".")
        if last in PARAM_KEYS and param:
            spec = search.get(param)
            search[param] = {**(spec if isinstance(spec, Mapping) else {}), last: value}
        else:
            search[key[len("search."):]] = value
    if search:
        out["search"] = search
    return out


def parse_space(data: Mapping[str, Any], path: str = "<memory>") -> SearchSpace:
    _no_unknown(data, TOP_KEYS, "")
    for key in TOP_KEYS:
        if key not in data or not isinstance(data[key], Mapping):
            raise ConfigError(key, f"missing section '{key}' (a mapping); a search-space file has {', '.join(TOP_KEYS)}")
    settings = build(StudySettings, data["study"], "study.", strict=True)
    trial = dict(data["trial"])
    try:
        base = trial_from_dict(trial)
    except ConfigError as e:
        raise ConfigError(f"trial.{e.key}", e.message) from None
    params = [_parse_param(key, spec, trial, base) for key, spec in data["search"].items()]
    if not params:
        raise ConfigError("search", "no parameter to search; add at least one (e.g. prune.keep_fraction)")
    settings = resolve_stratify(settings, params)
    return SearchSpace(path=str(path), study=settings, trial=trial, params=_ordered(params), raw=dict(data))


def _no_unknown(data: Mapping[str, Any], valid: typing.Iterable[str], prefix: str) -> None:
    valid = list(valid)
    for key in data:
        if key not in valid:
            raise unknown_key(f"{prefix}{key}", key, valid)


def _number(value: Any, key: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        raise ConfigError(key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"{value!r} is out of range; must be finite")
    return int(value) if integer else float(value)


# --- parameters -------------------------------------------------------------------------------------


def leaf_fields(cls: type = TrialConfig, prefix: str = "") -> dict[str, type]:
    """Dotted key -> type of every leaf field of a (nested) config dataclass."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(leaf_fields(typ, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = typ
    return out


def _check_key(key: str) -> type:
    leaves = leaf_fields()
    if key in leaves:
        return leaves[key]
    section, _, _ = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in leaves if k.rpartition(".")[0] == section]
    if siblings:
        hint = did_you_mean(key.rpartition(".")[2], siblings, prefix=f"{section}.")
        raise ConfigError(f"search.{key}", f"not a trial config field{hint}; valid keys in {section or 'the top level'}: {', '.join(siblings)}")
    sections = sorted({k.split(".")[0] for k in leaves if "." in k})
    raise ConfigError(f"search.{key}", f"not a trial config field{did_you_mean(key.split('.')[0], sections)}; "
                      f"valid sections: {', '.join(sections)}")


def _parse_param(key: Any, spec: Any, trial: Mapping[str, Any], base: TrialConfig) -> Param:
    k = f"search.{key}"
    if not isinstance(key, str):
        raise ConfigError(k, "a searched key is a dotted trial config key, e.g. prune.keep_fraction")
    typ = _check_key(key)
    if not isinstance(spec, Mapping):
        raise ConfigError(k, "expected {float: [lo, hi]}, {int: [lo, hi]} or {choice: [a, b, ...]}")
    _no_unknown(spec, PARAM_KEYS, k + ".")
    kinds = [kind for kind in ("float", "int", "choice") if kind in spec]
    if len(kinds) != 1:
        raise ConfigError(k, "give exactly one of float: [lo, hi], int: [lo, hi], choice: [...]")
    kind = kinds[0]
    when = _parse_when(spec.get("when"), k)
    if not when and _has_key(trial, key):
        raise ConfigError(k, "is both fixed in trial: and searched; remove one (a fixed value only makes sense as the fallback of a `when:` parameter)")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(k + ".log", f"expected true or false, got {log!r}")
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(k + ".choice", "expected a non-empty list of values")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(k + ".choice", "a value is listed twice")
        if log or "step" in spec:
            raise ConfigError(k, "log and step apply to float and int ranges, not to a choice")
        for c in choices:
            if not isinstance(c, (str, int, float, bool)) and c is not None:
                raise ConfigError(k + ".choice", f"choices are numbers, strings or booleans, got {c!r}")
            _check_value(key, c, base, k + ".choice")
        return Param(key, "choice", choices=tuple(choices), when=when)
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(f"{k}.{kind}", "expected [low, high]")
    if kind == "int" and typ is not int:
        raise ConfigError(f"{k}.int", f"{key} is a {typ.__name__} field; use float: [lo, hi] or choice:")
    if kind == "float" and typ is not float:
        valid = "int: [lo, hi] or choice:" if typ is int else "choice: [...]"
        raise ConfigError(f"{k}.float", f"{key} is a {typ.__name__} field; use {valid}")
    low, high = (_number(b, f"{k}.{kind}", integer=kind == "int") for b in bounds)
    if low >= high:
        raise ConfigError(f"{k}.{kind}", f"low {low:g} must be below high {high:g}")
    if log and low <= 0:
        raise ConfigError(f"{k}.{kind}", f"a log range needs low > 0, got {low:g}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, k + ".step", integer=kind == "int")
        if step <= 0 or step > high - low:
            raise ConfigError(k + ".step", f"{step:g} must be > 0 and <= high - low ({high - low:g})")
        if log:
            raise ConfigError(k, "Optuna cannot combine step and log; drop one")
    for value in (low, high):
        _check_value(key, value, base, f"{k}.{kind}")
    return Param(key, kind, low=low, high=high, log=log, step=step, when=when)


def _has_key(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _check_value(key: str, value: Any, base: TrialConfig, where: str) -> None:
    """Range and registry checks come from config.build; the dense model must not depend on a search."""
    try:
        cfg = trial_from_dict(dataclasses.asdict(base), {key: value})
    except ConfigError as e:
        raise ConfigError(where, f"{value!r}: {e.message}") from None
    if cfg.pretrain_key() != base.pretrain_key():
        raise ConfigError(where, f"{key} changes the dense pretrained model, which is trained once per study; fix it in trial: (run one study per value)")


def _parse_when(raw: Any, k: str) -> tuple[tuple[str, tuple], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(k + ".when", "expected {other.searched.key: [values]}")
    out = []
    for parent, allowed in raw.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        out.append((str(parent), tuple(allowed)))
    return tuple(out)


def _ordered(params: list[Param]) -> tuple[Param, ...]:
    """Check every condition names an unconditional-or-earlier searched choice; order parents first."""
    by_key = {p.key: p for p in params}
    for p in params:
        for parent, allowed in p.when:
            where = f"search.{p.key}.when.{parent}"
            if parent not in by_key:
                choices = [q.key for q in params if q.kind == "choice" and q.key != p.key]
                raise ConfigError(where, f"a condition must name a searched choice{did_you_mean(parent, choices)}; "
                                  f"valid choices: {', '.join(choices) or '(none)'}")
            if by_key[parent].kind != "choice":
                raise ConfigError(where, f"{parent} is a {by_key[parent].kind} range; a condition needs a searched choice")
            bad = [v for v in allowed if v not in by_key[parent].choices]
            if bad:
                raise ConfigError(where, f"{bad[0]!r} is not a choice of {parent}{did_you_mean(bad[0], by_key[parent].choices)}; "
                                  f"valid choices: {', '.join(map(str, by_key[parent].choices))}")
    ordered: list[Param] = []
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(parent in {q.key for q in ordered} for parent, _ in p.when)]
        if not ready:
            raise ConfigError(f"search.{pending[0].key}.when", "conditions form a cycle")
        ordered += ready
        pending = [p for p in pending if p not in ready]
    return tuple(ordered)
