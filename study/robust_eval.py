"""The test-split evaluation of the models a study chose, and robustness objectives of a study.

Model selection sees validation data only; the TEST split is evaluated once per Pareto-front trial, after
the search (study.runner.Study.final_evaluation), in up to two parts:

- the confirmation (`study.confirm`, always): clean accuracy, strong PGD-Linf (default 50 steps of
  2.5*eps/50, 3 restarts, per-point worst case) and standard AutoAttack at the trial's eval eps;
  `test_robust_acc` is the per-point worst case over both. Saved as trials/<n>/confirm.json, logged as
  `test_*` metrics and the tag `test_attack` (attack and budget in words);
- the robustness suite's final part (`study.robustness.final_budget`, only with that section), logged with
  the `test.` prefix (`test.robust.linf.0.1`, `test.autoattack.linf.0.1`, ...).

The suite's search part runs per trial with the cheap `search_budget` on the VALIDATION split; its flat
metrics (`robust.linf.0.1`, `auc.l2`, `scenario.linf.0.1.r0.5`, ...) join the trial's final metrics, so
an objective may name one.

    study:
      confirm: {points: 0, steps: 50, restarts: 3, autoattack: true}   # the defaults (points 0 = all of test)
      objectives:
        - {metric: params_kept, mode: min}
        - {metric: robust.l2.1.0, mode: max}          # canonical name: robust.l2.1
      robustness:
        threats: {linf: [0.05, 0.1], l2: [0.5, 1.0], l0: [2, 4]}
        scenario_r: [0, 0.5, 1]                        # optional (default 0, 0.1, 0.25, 0.5, 1)
        search_budget: {points: 128, steps: 10, restarts: 1}
        final_budget: {points: 512, steps: 50, restarts: 2, autoattack: true}

Parsing needs no torch (loading a search-space file stays fast); torch is imported by the evaluations.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from study.config import ConfigError

THREATS = ("linf", "l2", "l0")
AA_THREATS = ("linf", "l2")  # standard AutoAttack covers these
DEFAULT_R = (0.0, 0.1, 0.25, 0.5, 1.0)
# Suite metric families that may serve as objectives (autoattack.* is measured on the final front only).
SUITE_FAMILIES = ("robust.<threat>.<eps>", "robust_nested.<threat>.<eps>", "auc.<threat>",
                  "scenario.<threat>.<eps>.r<r>")
# Suite metric names that collide with the pipeline's final metrics: the pipeline's figure is kept.
SHADOWED = ("clean_acc",)
FINAL_PREFIX = "test."  # the suite's final (test split) metrics; was `final.`
FINAL_FILE = "robustness_final.json"
CONFIRM_FILE = "confirm.json"
# The confirmation's figures (study.confirm), in column order; `test_attack` names attack and budget.
TEST_METRICS = ("test_clean_acc", "test_robust_acc", "test_pgd_acc", "test_autoattack_acc", "test_points")


def fmt(v: float) -> str:
    """Eps and r as the suite prints them in metric names (study.robustness.suite._fmt)."""
    return f"{v:.4f}".rstrip("0").rstrip(".") or "0"


@dataclass(frozen=True)
class Budget:
    points: int = 512
    steps: int = 50
    restarts: int = 2
    seed: int = 0
    batch_size: int = 256
    square_queries: int = 1000
    autoattack: bool = False  # final budget only: standard AutoAttack beside PGD
    autoattack_eps: dict | None = None  # threat -> eps list; None = every eps > 0 of linf and l2

    def eval_budget(self) -> Any:
        from study.robustness import EvalBudget

        return EvalBudget(points=self.points, steps=self.steps, restarts=self.restarts, seed=self.seed,
                          batch_size=self.batch_size, square_queries=self.square_queries)


SEARCH_DEFAULT = Budget(points=128, steps=10, restarts=1, square_queries=200)
FINAL_DEFAULT = Budget()


@dataclass(frozen=True)
class ConfirmSettings:
    """`study.confirm`: the test-split confirmation of every Pareto-front trial (on by default; the
    runner's --no-final-eval skips it, `study resume` runs it later)."""

    points: int = 0  # test points (a seeded subset); 0 = the whole test split
    steps: int = 50  # PGD-Linf steps
    restarts: int = 3  # random restarts; a point counts as robust only if it survives all (per-point worst case)
    step_size: float = 0.0  # relative to eps; 0 = auto = 2.5 / steps
    autoattack: bool = True  # standard AutoAttack (pyautoattack) beside PGD
    seed: int = 0  # points, random starts, AutoAttack

    def attack_text(self, eps: float | None = None, points: int | None = None) -> str:
        """`test_attack`: e.g. "PGD-50 x3 restarts (step 2.5*eps/50) + standard AutoAttack, Linf eps 0.1,
        360 test points" (`points`: the number evaluated; eps None: the trial's eval eps)."""
        from study.evaluation import step_text

        whole = " (the whole test split)" if self.points <= 0 else ""
        where = f"{points} test points{whole}" if points is not None else (
            f"{self.points} test points" if self.points > 0 else "the whole test split")
        aa = " + standard AutoAttack" if self.autoattack else " (no AutoAttack)"
        return (f"PGD-{self.steps} x{self.restarts} restarts (step {step_text(self.step_size, self.steps)}){aa}, "
                f"Linf eps {'of the trial' if eps is None else f'{eps:g}'}, {where}")


CONFIRM_DEFAULT = ConfirmSettings()
CONFIRM_KEYS = tuple(f.name for f in dataclasses.fields(ConfirmSettings))


@dataclass(frozen=True)
class RobustnessSettings:
    threats: dict = field(default_factory=dict)  # threat -> sorted eps list
    scenario_r: tuple = DEFAULT_R
    search_budget: Budget = SEARCH_DEFAULT
    final_budget: Budget = FINAL_DEFAULT

    def suite_kwargs(self, final: bool) -> dict[str, Any]:
        b = self.final_budget if final else self.search_budget
        aa = final and b.autoattack
        return {"threats": {t: list(e) for t, e in self.threats.items()}, "budget": b.eval_budget(),
                "autoattack": aa, "autoattack_eps": b.autoattack_eps if aa else None,
                "scenario_r": list(self.scenario_r)}

    def metric_names(self) -> list[str]:
        """Every suite metric that may be an objective, canonical names."""
        out = []
        for t, eps in self.threats.items():
            out.append(f"auc.{t}")
            for e in eps:
                out += [f"robust.{t}.{fmt(e)}", f"robust_nested.{t}.{fmt(e)}"]
                out += [f"scenario.{t}.{fmt(e)}.r{fmt(r)}" for r in self.scenario_r]
        return out


# ---------------------------------------------------------------------------------------------------
# Parsing (called by study.space; keys are dotted from `study.robustness`).

_KEY = "study.robustness"


def parse_robustness(raw: Any) -> RobustnessSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError(_KEY, "expected a mapping with threats (required), scenario_r, search_budget, final_budget")
    valid = ("threats", "scenario_r", "search_budget", "final_budget")
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{_KEY}.{key}", f"unknown key; valid keys: {', '.join(valid)}")
    if "threats" not in raw:
        raise ConfigError(f"{_KEY}.threats", f"required: threat -> eps list, threats among {', '.join(THREATS)}")
    threats = _parse_threats(raw["threats"])
    out: dict[str, Any] = {"threats": threats}
    if raw.get("scenario_r") is not None:
        rs = raw["scenario_r"]
        k = f"{_KEY}.scenario_r"
        if not isinstance(rs, list) or not rs:
            raise ConfigError(k, "expected a non-empty list of fractions in [0, 1]")
        vals = [_num(r, k) for r in rs]
        if any(not 0 <= r <= 1 for r in vals) or len(set(vals)) != len(vals):
            raise ConfigError(k, f"fractions must be distinct and in [0, 1], got {rs}")
        out["scenario_r"] = tuple(vals)
    for name, default in (("search_budget", SEARCH_DEFAULT), ("final_budget", FINAL_DEFAULT)):
        if raw.get(name) is not None:
            out[name] = _parse_budget(raw[name], f"{_KEY}.{name}", default, threats, final=name == "final_budget")
    return RobustnessSettings(**out)


def _num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {value!r}")
    return float(value)


def _eps_list(threat: str, eps: Any, key: str) -> list[float]:
    if not isinstance(eps, list) or not eps:
        raise ConfigError(key, "expected a non-empty eps list (Linf/L2 in [0, 1] pixel units, L0 in pixels)")
    out = [_num(e, key) for e in eps]
    for e in out:
        if e < 0:
            raise ConfigError(key, f"eps must be >= 0, got {e:g}")
        if threat == "linf" and e > 1:
            raise ConfigError(key, f"Linf eps {e:g} > 1 is outside [0, 1] pixel units (did you mean {e:g}/255 = {e / 255:.4f}?)")
        if threat == "l0" and e != int(e):
            raise ConfigError(key, f"L0 eps is a pixel count and must be an integer, got {e:g}")
    if len({fmt(e) for e in out}) != len(out):
        raise ConfigError(key, f"duplicate eps in {eps} (eps are compared at 4 decimals)")
    return sorted(out)


def _parse_threats(raw: Any) -> dict[str, list[float]]:
    key = f"{_KEY}.threats"
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(key, f"expected a mapping threat -> eps list, threats among {', '.join(THREATS)}")
    out = {}
    for t, eps in raw.items():
        if t not in THREATS:
            raise ConfigError(f"{key}.{t}", f"unknown threat model; valid choices: {', '.join(THREATS)}")
        out[t] = _eps_list(t, eps, f"{key}.{t}")
    return out


def _parse_budget(raw: Any, key: str, default: Budget, threats: Mapping[str, list], final: bool) -> Budget:
    fields = [f.name for f in dataclasses.fields(Budget)]
    valid = fields if final else [f for f in fields if not f.startswith("autoattack")]
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping; valid keys: {', '.join(valid)}")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        where = f"{key}.{k}"
        if k not in valid:
            hint = " (AutoAttack runs on the final front only: set it in final_budget)" if k in fields else ""
            raise ConfigError(where, f"unknown key{hint}; valid keys: {', '.join(valid)}")
        if k == "autoattack":
            if not isinstance(v, bool):
                raise ConfigError(where, f"expected true or false, got {v!r}")
            out[k] = v
        elif k == "autoattack_eps":
            if not isinstance(v, Mapping) or not v:
                raise ConfigError(where, "expected a mapping threat -> eps list (linf and/or l2)")
            aa = {}
            for t, eps in v.items():
                if t not in AA_THREATS or t not in threats:
                    choices = [a for a in AA_THREATS if a in threats]
                    raise ConfigError(f"{where}.{t}", f"AutoAttack runs on an evaluated threat among linf, l2; "
                                      f"valid choices: {', '.join(choices) or '(none: add linf or l2 to threats)'}")
                aa[t] = _eps_list(t, eps, f"{where}.{t}")
            out[k] = aa
        else:
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "seed" else 1):
                raise ConfigError(where, f"expected an integer >= {0 if k == 'seed' else 1}, got {v!r}")
            out[k] = v
    if out.get("autoattack_eps") and not out.get("autoattack", default.autoattack):
        raise ConfigError(f"{key}.autoattack_eps", "given while autoattack is false; set autoattack: true")
    return dataclasses.replace(default, **out)


def is_suite_name(name: str) -> bool:
    """Shaped like a suite metric (robust.*, robust_nested.*, auc.*, scenario.*, autoattack.*)."""
    return name.partition(".")[0] in ("robust", "robust_nested", "auc", "scenario", "autoattack") and "." in name


def canonical_metric(name: str, settings: RobustnessSettings | None) -> str | None:
    """The suite's own name of objective `name` (`robust.l2.1.0` -> `robust.l2.1`), or None when `name`
    is not shaped like a suite metric. Raises ConfigError (key = the objective's metric, set by the
    caller) when it is shaped like one but the section does not evaluate it."""
    family, _, rest = name.partition(".")
    if family not in ("robust", "robust_nested", "auc", "scenario", "autoattack"):
        return None
    if family == "autoattack":
        raise ValueError("AutoAttack runs only on the final Pareto front (final_budget.autoattack), so it cannot "
                         "steer the search; use robust.<threat>.<eps> (PGD + APGD-CE) as the objective")
    if settings is None:
        raise ValueError("a robustness-suite metric: add a study.robustness section with its threat "
                         "and eps (e.g. robustness: {threats: {linf: [0.1]}})")
    threat, _, rest = rest.partition(".")
    valid = settings.metric_names()
    shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
    if threat not in settings.threats:
        raise ValueError(f"threat {threat!r} is not evaluated; study.robustness.threats has "
                         f"{', '.join(settings.threats)}; valid suite metrics: {shown}")
    if family == "auc":
        if rest:
            raise ValueError(f"expected auc.{threat}; valid suite metrics: {shown}")
        return f"auc.{threat}"
    eps_text, r_text = rest, None
    if family == "scenario":
        eps_text, sep, r_text = rest.partition(".r")
        if not sep:
            raise ValueError(f"expected scenario.<threat>.<eps>.r<r>; valid suite metrics: {shown}")
    try:
        eps = fmt(float(eps_text))
        r = fmt(float(r_text)) if r_text is not None else None
    except ValueError:
        raise ValueError(f"cannot read the eps (or r) of {name!r}; valid suite metrics: {shown}") from None
    if eps not in {fmt(e) for e in settings.threats[threat]}:
        raise ValueError(f"eps {eps_text} is not in study.robustness.threats.{threat} "
                         f"({', '.join(fmt(e) for e in settings.threats[threat])}); valid suite metrics: {shown}")
    if r is not None and r not in {fmt(x) for x in settings.scenario_r}:
        raise ValueError(f"r {r_text} is not in study.robustness.scenario_r "
                         f"({', '.join(fmt(x) for x in settings.scenario_r)}); valid suite metrics: {shown}")
    return f"{family}.{threat}.{eps}" + (f".r{r}" if r is not None else "")


# ---------------------------------------------------------------------------------------------------
# Evaluations (torch from here on).


def load_model(cfg: Any, model_state: Mapping[str, Any], info: Any, device: Any) -> Any:
    """The trial's architecture with its exported (plain, hard-zero) state dict, in eval mode."""
    from study.models import create_model

    model = create_model(cfg.model.arch, info, width=cfg.model.width)
    model.load_state_dict(dict(model_state))
    return model.to(device).eval()


def evaluate(cfg: Any, model_state: Mapping[str, Any], settings: RobustnessSettings, *, final: bool,
             device: Any = None, splits: Any = None) -> Any:
    """The suite on the trial's model: validation split with the search budget, or test split with the
    final budget (and AutoAttack where set). Returns the RobustnessReport."""
    import torch

    from study.data import load_dataset
    from study.robustness import evaluate_robustness

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    sp = splits if splits is not None else load_dataset(cfg.data, device)
    model = load_model(cfg, model_state, sp.info, device)
    x, y = (sp.x_test, sp.y_test) if final else (sp.x_val, sp.y_val)
    return evaluate_robustness(model, x, y, device=device, **settings.suite_kwargs(final))


def search_metrics(report: Any, pipeline_metrics: Mapping[str, float]) -> dict[str, float]:
    """The report's finite flat metrics to merge into a trial's final metrics (unprefixed, so objectives
    match; a name the pipeline already reports, e.g. clean_acc, keeps the pipeline's figure)."""
    return {k: float(v) for k, v in report.flat_metrics().items()
            if k not in pipeline_metrics and k not in SHADOWED and isinstance(v, (int, float)) and math.isfinite(v)}


def final_metrics(report: Any) -> dict[str, float]:
    return {FINAL_PREFIX + k: float(v) for k, v in report.flat_metrics().items() if math.isfinite(v)}


def front_columns(final: Mapping[str, float], objectives: Sequence[str]) -> dict[str, float]:
    """The suite's test metrics worth a column of the Pareto table/CSV: clean, robust per eps, AUC,
    AutoAttack, the objectives' own test figures, suspect."""
    p = FINAL_PREFIX
    keep = (f"{p}clean_acc", f"{p}suspect")
    out = {k: v for k, v in final.items()
           if k in keep or k.startswith((f"{p}robust.", f"{p}auc.", f"{p}autoattack."))
           or k[len(p):] in objectives}
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == f"{p}suspect", kv[0])))


def terminal_column(key: str, objectives: Sequence[str], row: Mapping[str, Any] = {}) -> bool:
    """The test columns printed in the terminal table (the CSV has them all): the confirmation's clean and
    robust figures (its attack is named in a line above the table), the suite's test figures of the
    objectives, AutoAttack and the PGD figure beside it, suspect."""
    p = FINAL_PREFIX
    if key.startswith("test_"):
        return key in ("test_clean_acc", "test_robust_acc")
    name = key[len(p):]
    return (not key.startswith(p) or key == f"{p}suspect" or name.startswith("autoattack.")
            or name in objectives or (name.startswith("robust.") and f"{p}autoattack.{name[7:]}" in row))


def save_final(directory: str | Path, report: Any, budget: Budget) -> Path:
    path = Path(directory) / FINAL_FILE
    payload = {"budget": dataclasses.asdict(budget), "report": report.to_dict(), "metrics": final_metrics(report),
               "failed_checks": [c.name for c in report.checks if not c.passed]}
    return _write_json(path, payload)


def load_final(directory: str | Path, budget: Budget | None = None) -> dict | None:
    """A trial's saved final evaluation (None if absent, or run with another budget than `budget`)."""
    return _read_json(Path(directory) / FINAL_FILE, budget)


def _write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(payload), indent=2))
    os.replace(tmp, path)
    return path


def _read_json(path: Path, budget: Any = None) -> dict | None:
    """A saved evaluation, or None if absent, unreadable, or made with another budget than `budget`."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if budget is not None and payload.get("budget") != json.loads(json.dumps(dataclasses.asdict(budget))):
        return None
    return payload


def evaluate_on_test(cfg: Any, model_path: str, confirm_settings: ConfirmSettings | None,
              suite: RobustnessSettings | None, threads: int = 1) -> tuple[dict | None, Any]:
    """Body of the Ray task that evaluates one front trial on the TEST split (on a trial's resources): the
    confirmation (None: skipped) and the suite's final part (None: skipped). Returns (payload, report)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from study.data import load_dataset

    torch.set_num_threads(max(1, int(threads)))
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    device = _device(cfg)
    sp = load_dataset(cfg.data, device)
    payload = confirm(cfg, state, confirm_settings, device=device, splits=sp) if confirm_settings else None
    report = evaluate(cfg, state, suite, final=True, device=device, splits=sp) if suite is not None else None
    return payload, report


def _device(cfg: Any) -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")


# ---------------------------------------------------------------------------------------------------
# The confirmation (study.confirm): clean, strong PGD and standard AutoAttack on the test split.


def confirm(cfg: Any, model_state: Mapping[str, Any], settings: ConfirmSettings = CONFIRM_DEFAULT, *,
            device: Any = None, splits: Any = None) -> dict[str, Any]:
    """The chosen model's test figures at the trial's eval eps (Linf). Per point: clean, PGD (correct under
    every restart), AutoAttack; `test_robust_acc` = correct under both, so it is never above either.
    Returns the payload saved as confirm.json: budget, eps, test_attack, metrics, AutoAttack's warnings."""
    import time

    from study.data import load_dataset
    from study.evaluation import pgd_flags, subset

    device = device if device is not None else _device(cfg)
    sp = splits if splits is not None else load_dataset(cfg.data, device)
    model = load_model(cfg, model_state, sp.info, device)
    x, y = subset(sp.x_test, sp.y_test, settings.points, settings.seed)
    eps, n = cfg.eval_eps, len(x)
    t0 = time.perf_counter()
    clean, robust = pgd_flags(model, x, y, eps=eps, steps=settings.steps, step_size=settings.step_size,
                              restarts=settings.restarts, seed=settings.seed, batch_size=cfg.data.eval_batch_size)
    wall = {"pgd": time.perf_counter() - t0}
    metrics = {"test_clean_acc": _mean(clean), "test_pgd_acc": _mean(robust)}
    flags: list[str] = []
    if settings.autoattack:
        from study.robustness.autoattack import autoattack
        from study.robustness.threats import Threat

        t0 = time.perf_counter()
        aa, flags = autoattack(model, x, y, Threat.LINF, eps, seed=settings.seed, batch_size=cfg.data.eval_batch_size)
        wall["autoattack"] = time.perf_counter() - t0
        metrics["test_autoattack_acc"] = _mean(aa)
        robust = robust & aa.to(robust.device)
    metrics["test_robust_acc"] = _mean(robust)
    metrics["test_points"] = float(n)
    return {"budget": dataclasses.asdict(settings), "eps": eps,
            "test_attack": settings.attack_text(eps, n),
            "metrics": metrics, "autoattack_flags": flags, "wall_s": wall}


def _mean(flags: Any) -> float:
    return int(flags.sum()) / len(flags) if len(flags) else 0.0  # an exact fraction of the points


def save_confirm(directory: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write trials/<n>/confirm.json atomically."""
    return _write_json(Path(directory) / CONFIRM_FILE, payload)


def load_confirm(directory: str | Path, settings: ConfirmSettings | None = None) -> dict | None:
    """A trial's saved confirmation (None if absent, unreadable, or run with other settings)."""
    return _read_json(Path(directory) / CONFIRM_FILE, settings)


def confirm_columns(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The Pareto row's columns of a saved confirmation: the test_* figures and `test_attack`."""
    m = payload.get("metrics", {})
    out: dict[str, Any] = {k: m[k] for k in TEST_METRICS if k in m}
    out["test_attack"] = payload.get("test_attack", "")
    return out


def budget_text(b: Budget) -> str:
    aa = ", standard AutoAttack" + (f" at {b.autoattack_eps}" if b.autoattack_eps else "") if b.autoattack else ""
    return f"{b.points} points, {b.steps} steps x {b.restarts} restarts{aa}"
