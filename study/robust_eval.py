"""Robustness objectives of a study: the `study.robustness` section, suite metrics as objectives, and the
two evaluations built on `study.robustness.evaluate_robustness`:

- search (per trial, cheap `search_budget`, on the VALIDATION split: model selection never sees test);
  its flat metrics (`robust.linf.0.1`, `auc.l2`, `scenario.linf.0.1.r0.5`, ...) join the trial's final
  metrics, so an objective may name one;
- final (once per Pareto-front trial, full `final_budget`, on the TEST split, optionally with standard
  AutoAttack); logged with a `final.` prefix.

    study:
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
FINAL_PREFIX = "final."
FINAL_FILE = "robustness_final.json"


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
    """The final metrics worth a column of the Pareto table/CSV: clean, robust per eps, AUC, AutoAttack,
    the objectives' own final figures, suspect."""
    keep = ("final.clean_acc", "final.suspect")
    out = {k: v for k, v in final.items()
           if k in keep or k.startswith(("final.robust.", "final.auc.", "final.autoattack."))
           or k[len(FINAL_PREFIX):] in objectives}
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "final.suspect", kv[0])))


def terminal_column(key: str, objectives: Sequence[str], row: Mapping[str, Any] = {}) -> bool:
    """The final columns printed in the terminal table (the CSV has them all): the objectives' own final
    figures, AutoAttack and the PGD figure beside it, suspect."""
    name = key[len(FINAL_PREFIX):]
    return (not key.startswith(FINAL_PREFIX) or key == "final.suspect" or name.startswith("autoattack.")
            or name in objectives or (name.startswith("robust.") and f"final.autoattack.{name[7:]}" in row))


def save_final(directory: str | Path, report: Any, budget: Budget) -> Path:
    path = Path(directory) / FINAL_FILE
    payload = {"budget": dataclasses.asdict(budget), "report": report.to_dict(), "metrics": final_metrics(report),
               "failed_checks": [c.name for c in report.checks if not c.passed]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def load_final(directory: str | Path, budget: Budget | None = None) -> dict | None:
    """A trial's saved final evaluation (None if absent, or run with another budget than `budget`)."""
    path = Path(directory) / FINAL_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if budget is not None and payload.get("budget") != json.loads(json.dumps(dataclasses.asdict(budget))):
        return None
    return payload


def final_task(cfg: Any, model_path: str, settings: RobustnessSettings, threads: int = 1) -> Any:
    """Body of the Ray task that runs the final evaluation of one front trial (on a trial's resources)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(max(1, int(threads)))
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    return evaluate(cfg, state, settings, final=True)


def budget_text(b: Budget) -> str:
    aa = ", standard AutoAttack" + (f" at {b.autoattack_eps}" if b.autoattack_eps else "") if b.autoattack else ""
    return f"{b.points} points, {b.steps} steps x {b.restarts} restarts{aa}"
