"""Search-space files: strict loading, validation, and the Optuna define-by-run space.

A search-space file is one runnable study (see search_spaces/*.yaml and docs/study.md):

    study:  settings of the search (name, sampler, trial count, concurrency, objectives, ...)
    trial:  fixed TrialConfig values (a nested mapping, as in a trial config file)
    search: dotted TrialConfig key -> {float: [lo, hi]} | {int: [lo, hi]} | {choice: [...]},
            optionally with `log: true`, `step: s` and `when: {other.key: [values]}` (conditional)

Everything is checked before anything starts: unknown keys, bad ranges, unknown choices (registry
names included, via config.build), searched keys that would change the dense pretrained model (it is
trained once per study), and conditions that name no searched choice. Errors are `ConfigError`s naming
the file, the dotted key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from study.config import ConfigError, TrialConfig, merge, read_yaml, trial_from_dict, unflatten
from study.robust_eval import (CONFIRM_DEFAULT, CONFIRM_KEYS, SUITE_FAMILIES, ConfirmSettings, RobustnessSettings,
                               canonical_metric, is_suite_name, parse_robustness)

SAMPLERS = ("tpe", "nsga2", "gp", "random")
# Final metrics of a trial (pipeline.TrialResult.metrics) that may serve as objectives: selection-safe
# ones only, i.e. sizes and validation figures. Test figures exist for chosen models only (study.confirm).
OBJECTIVE_METRICS = (
    "params_kept", "prunable_kept", "compression", "sparsity", "sparse_bytes",
    "val_robust_acc", "val_clean_acc",
)
# Names that are not selection-safe, with the validation figure to use instead.
_TEST_FIGURES = {"robust_acc": "val_robust_acc", "clean_acc": "val_clean_acc", "test_clean_acc": "val_clean_acc",
                 "test_robust_acc": "val_robust_acc", "test_pgd_acc": "val_robust_acc",
                 "test_autoattack_acc": "val_robust_acc"}
TOP_KEYS = ("study", "trial", "search")
PARAM_KEYS = ("float", "int", "choice", "log", "step", "when")


@dataclass(frozen=True)
class Objective:
    metric: str  # a final trial metric: one of OBJECTIVE_METRICS, or a suite metric (canonical name) of `robustness`
    mode: str  # "min" | "max"


@dataclass(frozen=True)
class StudySettings:
    name: str = "study"  # names the folder runs/<name>, the Optuna study and the MLflow experiment
    sampler: str = "tpe"  # one of SAMPLERS
    sampler_options: dict = field(default_factory=dict)  # keyword arguments of the Optuna sampler
    n_trials: int = 8  # trials in total (COMPLETE + FAIL), across resumes
    max_concurrent: int = 1  # trials running at once
    time_budget_s: float = 0.0  # wall-clock budget of the whole search; 0 = none
    gpus_per_trial: str | float = "auto"  # auto = 1 where the cluster has GPUs, else 0
    cpus_per_trial: float = 1.0  # also sets torch's thread count inside the trial
    max_failures: int = 0  # Tune retries of a crashed trial (a NaN loss fails the same way again)
    seed: int = 0  # sampler seed
    storage: str = ""  # Optuna storage URL or journal file; "" = sqlite:///runs/<name>/optuna.db
    objectives: tuple[Objective, ...] = (Objective("params_kept", "min"), Objective("val_robust_acc", "max"))
    robustness: RobustnessSettings | None = None  # the robustness suite per trial (search) and on the front (final)
    confirm: ConfirmSettings = CONFIRM_DEFAULT  # test-split confirmation of every Pareto-front trial (always)

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
    settings = _parse_study(data["study"])
    trial = dict(data["trial"])
    try:
        base = trial_from_dict(trial)
    except ConfigError as e:
        raise ConfigError(f"trial.{e.key}", e.message) from None
    params = [_parse_param(key, spec, trial, base) for key, spec in data["search"].items()]
    if not params:
        raise ConfigError("search", "no parameter to search; add at least one (e.g. prune.keep_fraction)")
    return SearchSpace(path=str(path), study=settings, trial=trial, params=_ordered(params), raw=dict(data))


def _no_unknown(data: Mapping[str, Any], valid: typing.Iterable[str], prefix: str) -> None:
    valid = list(valid)
    for key in data:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key{hint}; valid keys: {', '.join(valid)}")


def _number(value: Any, key: str, *, integer: bool = False, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        raise ConfigError(key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise ConfigError(key, f"{value!r} is out of range; must be >= {minimum}")
    return int(value) if integer else float(value)


def _parse_study(raw: Mapping[str, Any]) -> StudySettings:
    names = [f.name for f in dataclasses.fields(StudySettings)]
    _no_unknown(raw, names, "study.")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = f"study.{key}"
        if key in ("name", "storage"):
            if not isinstance(value, str) or (key == "name" and not _safe_name(value)):
                raise ConfigError(k, f"expected a name of letters, digits, '-', '_' or '.', got {value!r}")
            out[key] = value
        elif key == "sampler":
            if value not in SAMPLERS:
                raise ConfigError(k, f"unknown sampler {value!r}; valid choices: {', '.join(SAMPLERS)}")
            out[key] = value
        elif key == "sampler_options":
            value = {} if value is None else value  # `--set study.sampler_options=null` clears them
            if not isinstance(value, Mapping):
                raise ConfigError(k, "expected a mapping of sampler keyword arguments")
            out[key] = dict(value)
        elif key in ("n_trials", "max_concurrent", "max_failures", "seed"):
            out[key] = _number(value, k, integer=True, minimum=0 if key in ("max_failures", "seed") else 1)
        elif key in ("time_budget_s", "cpus_per_trial"):
            out[key] = _number(value, k, minimum=0.0)
            if key == "cpus_per_trial" and out[key] <= 0:
                raise ConfigError(k, f"{value!r} is out of range; must be > 0")
        elif key == "gpus_per_trial":
            out[key] = value if value == "auto" else _number(value, k, minimum=0.0)
        elif key == "objectives":
            out[key] = _parse_objectives(value)
        elif key == "robustness":
            out[key] = None if value is None else parse_robustness(value)
        elif key == "confirm":
            out[key] = _parse_confirm(value)
    if "objectives" in out:
        out["objectives"] = _suite_objectives(out["objectives"], out.get("robustness"))
    settings = StudySettings(**out)
    _check_sampler_options(settings)
    return settings


def _parse_confirm(raw: Any) -> ConfirmSettings:
    """study.confirm: {points, steps, restarts, step_size, autoattack, seed}; null = the defaults."""
    key = "study.confirm"
    if raw is None:
        return CONFIRM_DEFAULT
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping; valid keys: {', '.join(CONFIRM_KEYS)} "
                          "(the whole confirmation is skipped with --no-final-eval)")
    _no_unknown(raw, CONFIRM_KEYS, key + ".")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        where = f"{key}.{k}"
        if k == "autoattack":
            if not isinstance(v, bool):
                raise ConfigError(where, f"expected true or false, got {v!r}")
            out[k] = v
        elif k == "step_size":
            out[k] = _number(v, where, minimum=0.0)  # relative to eps; 0 = auto = 2.5 / steps
        else:
            out[k] = _number(v, where, integer=True, minimum=0 if k in ("points", "seed") else 1)
    settings = dataclasses.replace(CONFIRM_DEFAULT, **out)
    if 0 < settings.step_size * settings.steps < 1:
        raise ConfigError(f"{key}.step_size", f"{settings.step_size:g} x {settings.steps} steps cannot reach the "
                          "eps-ball boundary; need steps * step_size >= 1 (or 0 = auto, 2.5 / steps)")
    return settings


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def _parse_objectives(raw: Any) -> tuple[Objective, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("study.objectives", "expected a list of {metric: NAME, mode: min|max}")
    out = []
    for i, item in enumerate(raw):
        key = f"study.objectives[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(key, "expected {metric: NAME, mode: min|max}")
        _no_unknown(item, ("metric", "mode"), key + ".")
        metric, mode = item.get("metric"), item.get("mode")
        if isinstance(metric, str):
            _refuse_test_metric(metric, key + ".metric")
        if not isinstance(metric, str) or (metric not in OBJECTIVE_METRICS and not is_suite_name(metric)):
            near = difflib.get_close_matches(str(metric), OBJECTIVE_METRICS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(key + ".metric", f"unknown metric {metric!r}{hint}; valid choices: {', '.join(OBJECTIVE_METRICS)}, "
                              f"or with a study.robustness section {', '.join(SUITE_FAMILIES)}")
        if mode not in ("min", "max"):
            raise ConfigError(key + ".mode", f"unknown mode {mode!r}; valid choices: min, max")
        out.append(Objective(metric, mode))
    if len({o.metric for o in out}) != len(out):
        raise ConfigError("study.objectives", "an objective metric is listed twice")
    return tuple(out)


def _refuse_test_metric(metric: str, key: str) -> None:
    """Objectives select models, so they must never name a test-split figure."""
    instead = _TEST_FIGURES.get(metric)
    if instead is None and metric.startswith(("test.", "final.")):
        instead = metric.partition(".")[2]  # the suite's test figure -> its validation figure (search budget)
        if instead.startswith("autoattack."):  # AutoAttack runs on the front only; PGD + APGD-CE is the search's
            instead = "robust." + instead.partition(".")[2]
    elif instead is None and metric.startswith("test_"):
        instead = "val_robust_acc"
    if instead is not None:
        raise ConfigError(key, f"{metric!r} is a test-split figure, and selection uses validation: did you mean "
                          f"{instead}? (test figures are measured only for the chosen models: study.confirm)")


def _suite_objectives(objectives: tuple[Objective, ...], robustness: RobustnessSettings | None) -> tuple[Objective, ...]:
    """Suite metrics (robust.<t>.<eps>, auc.<t>, scenario.<t>.<eps>.r<r>) must be evaluated by the
    `robustness` section; they are renamed to the suite's own spelling (robust.l2.1.0 -> robust.l2.1)."""
    out = []
    for i, o in enumerate(objectives):
        if o.metric in OBJECTIVE_METRICS:
            out.append(o)
            continue
        try:
            name = canonical_metric(o.metric, robustness)
        except ValueError as e:
            raise ConfigError(f"study.objectives[{i}].metric", f"{o.metric!r}: {e}") from None
        out.append(Objective(name, o.mode))
    if len({o.metric for o in out}) != len(out):
        raise ConfigError("study.objectives", "an objective metric is listed twice")
    return tuple(out)


def _check_sampler_options(settings: StudySettings) -> None:
    from study.runner import SAMPLER_CLASSES  # lazy: a cycle otherwise (the runner imports this module)

    cls = SAMPLER_CLASSES[settings.sampler]()
    valid = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "seed")]
    for key, value in settings.sampler_options.items():
        if key not in valid:
            raise ConfigError(f"study.sampler_options.{key}", f"not an option of the {settings.sampler} sampler; valid keys: {', '.join(valid) or '(none)'}")
        if not isinstance(value, (bool, int, float, str)) and value is not None:
            raise ConfigError(f"study.sampler_options.{key}", f"expected a number, string or boolean, got {value!r}")


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
        near = difflib.get_close_matches(key.rpartition(".")[2], siblings, n=1)
        hint = f" (did you mean '{section}.{near[0]}'?)" if near else ""
        raise ConfigError(f"search.{key}", f"not a trial config field{hint}; valid keys in {section or 'the top level'}: {', '.join(siblings)}")
    sections = sorted({k.split(".")[0] for k in leaves if "." in k})
    raise ConfigError(f"search.{key}", f"not a trial config field; valid sections: {', '.join(sections)}")


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
                raise ConfigError(where, f"a condition must name a searched choice; valid choices: {', '.join(choices) or '(none)'}")
            if by_key[parent].kind != "choice":
                raise ConfigError(where, f"{parent} is a {by_key[parent].kind} range; a condition needs a searched choice")
            bad = [v for v in allowed if v not in by_key[parent].choices]
            if bad:
                raise ConfigError(where, f"{bad[0]!r} is not a choice of {parent}; valid choices: {', '.join(map(str, by_key[parent].choices))}")
    ordered: list[Param] = []
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(parent in {q.key for q in ordered} for parent, _ in p.when)]
        if not ready:
            raise ConfigError(f"search.{pending[0].key}.when", "conditions form a cycle")
        ordered += ready
        pending = [p for p in pending if p not in ready]
    return tuple(ordered)
