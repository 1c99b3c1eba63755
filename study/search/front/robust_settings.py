"""What a study evaluates beyond its trials' own figures: the test-split confirmation of the front
(`study.confirm`), the LWM baseline at the front's sizes (`study.baselines`) and the robustness suite
(`study.robustness`), and the suite metrics an objective may name. Validated by the trial configs' builder (study.trial.config.build: field metadata, "did you mean").

    study:
      confirm: {points: 0, steps: 50, restarts: 3, autoattack: true}   # the defaults (points 0 = all of test)
      baselines: {confirm: {autoattack: false}}       # LWM at the front's sizes (default off; `true`: confirmed
                                                      # exactly like the front; here: PGD only, same PGD budget)
      objectives:
        - {metric: params_kept, mode: min}
        - {metric: robust.l2.1.0, mode: max}          # canonical name: robust.l2.1
      robustness:
        threats: {linf: [0.05, 0.1], l2: [0.5, 1.0], l0: [2, 4]}
        scenario_r: [0, 0.5, 1]                        # optional (default 0, 0.1, 0.25, 0.5, 1)
        search_budget: {points: 128, steps: 10, restarts: 1}
        final_budget: {points: 512, steps: 50, restarts: 2, autoattack: true}

The evaluations themselves are study.search.front.robust_eval.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from study.errors import ConfigError, unknown_value
from study.keys import fmt, suite_metric
from study.robustness.threats import AUTOATTACK_NORMS, THREATS
from study.trial.config import build, in_range

AA_THREATS = tuple(t.value for t in AUTOATTACK_NORMS)  # standard AutoAttack covers these
DEFAULT_R = (0.0, 0.1, 0.25, 0.5, 1.0)
# Suite metric families that may serve as objectives (autoattack.* is measured on the final front only).
SUITE_FAMILIES = ("robust.<threat>.<eps>", "robust_nested.<threat>.<eps>", "auc.<threat>",
                  "scenario.<threat>.<eps>.r<r>")
SUITE_PREFIXES = ("robust", "robust_nested", "auc", "scenario", "autoattack")  # what a suite name starts with
_FINAL_ONLY = "AutoAttack runs on the final front only: set it in final_budget"


def _finite(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {value!r}")
    return float(value)


def eps_list(threat: str, eps: Any, key: str) -> list[float]:
    """A threat's eps list, sorted: Linf/L2 in [0, 1] pixel units, L0 in pixels."""
    if not isinstance(eps, list) or not eps:
        raise ConfigError(key, "expected a non-empty eps list (Linf/L2 in [0, 1] pixel units, L0 in pixels)")
    out = [_finite(e, key) for e in eps]
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


def _threats(raw: Any, key: str) -> dict[str, list[float]]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(key, f"expected a mapping threat -> eps list, threats among {', '.join(THREATS)}")
    out = {}
    for t, eps in raw.items():
        if t not in THREATS:
            raise unknown_value(f"{key}.{t}", t, THREATS, "threat model")
        out[t] = eps_list(t, eps, f"{key}.{t}")
    return out


def _fractions(raw: Any, key: str) -> tuple[float, ...]:
    if raw is None:
        return DEFAULT_R
    if not isinstance(raw, list) or not raw:
        raise ConfigError(key, "expected a non-empty list of fractions in [0, 1]")
    vals = [_finite(r, key) for r in raw]
    if any(not 0 <= r <= 1 for r in vals) or len(set(vals)) != len(vals):
        raise ConfigError(key, f"fractions must be distinct and in [0, 1], got {raw}")
    return tuple(vals)


def _autoattack_eps(raw: Any, key: str) -> dict[str, list[float]]:
    """threat -> eps list; which threats may appear is checked with the section's threats (RobustnessSettings)."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(key, f"expected a mapping threat -> eps list ({' and/or '.join(AA_THREATS)})")
    return {t: eps_list(t, eps, f"{key}.{t}") if t in AA_THREATS else eps for t, eps in raw.items()}


@dataclass(frozen=True)
class Budget:
    points: int = field(default=512, metadata=in_range(1))
    steps: int = field(default=50, metadata=in_range(1))
    restarts: int = field(default=2, metadata=in_range(1))
    seed: int = field(default=0, metadata=in_range(0))
    batch_size: int = field(default=256, metadata=in_range(1))
    square_queries: int = field(default=1000, metadata=in_range(1))
    autoattack: bool = False  # final budget only: standard AutoAttack beside PGD
    # threat -> eps list; None = every eps > 0 of linf and l2
    autoattack_eps: dict | None = field(default=None, metadata={"parse": _autoattack_eps})

    def __post_init__(self) -> None:
        if self.autoattack_eps and not self.autoattack:
            raise ConfigError("autoattack_eps", "given while autoattack is false; set autoattack: true")

    def eval_budget(self) -> Any:
        from study.robustness import EvalBudget

        return EvalBudget(points=self.points, steps=self.steps, restarts=self.restarts, seed=self.seed,
                          batch_size=self.batch_size, square_queries=self.square_queries)

    def text(self) -> str:
        """The budget in words: "256 points, 50 steps x 2 restarts, standard AutoAttack"."""
        aa = ", standard AutoAttack" + (f" at {self.autoattack_eps}" if self.autoattack_eps else "") if self.autoattack else ""
        return f"{self.points} points, {self.steps} steps x {self.restarts} restarts{aa}"


SEARCH_DEFAULT = Budget(points=128, steps=10, restarts=1, square_queries=200)
FINAL_DEFAULT = Budget()


def _budget(default: Budget, final: bool):
    exclude = None if final else {"autoattack": _FINAL_ONLY, "autoattack_eps": _FINAL_ONLY}

    def parse(raw: Any, key: str) -> Budget:
        return default if raw is None else build(Budget, raw, key + ".", base=default, strict=True, exclude=exclude)

    return parse


@dataclass(frozen=True)
class ConfirmSettings:
    """`study.confirm`: the test-split confirmation of every Pareto-front trial (on by default;
    `--no-final-eval` of `study run | resume` skips it, `study resume` runs it later)."""

    points: int = field(default=0, metadata=in_range(0))  # test points (a seeded subset); 0 = the whole test split
    steps: int = field(default=50, metadata=in_range(1))  # PGD-Linf steps
    # random restarts; a point counts as robust only if it survives all (per-point worst case)
    restarts: int = field(default=3, metadata=in_range(1))
    step_size: float = field(default=0.0, metadata=in_range(0.0))  # relative to eps; 0 = auto = 2.5 / steps
    autoattack: bool = True  # standard AutoAttack (pyautoattack) beside PGD
    seed: int = field(default=0, metadata=in_range(0))  # points, random starts, AutoAttack

    def attack_text(self, eps: float | None = None, points: int | None = None) -> str:
        """`test_attack`: e.g. "PGD-50 x3 restarts (step 2.5*eps/50) + standard AutoAttack, Linf eps 0.1,
        360 test points" (`points`: the number evaluated; eps None: the trial's eval eps)."""
        from study.trial.evaluation import step_text

        whole = " (the whole test split)" if self.points <= 0 else ""
        where = f"{points} test points{whole}" if points is not None else (
            f"{self.points} test points" if self.points > 0 else "the whole test split")
        aa = " + standard AutoAttack" if self.autoattack else " (no AutoAttack)"
        return (f"PGD-{self.steps} x{self.restarts} restarts (step {step_text(self.step_size, self.steps)}){aa}, "
                f"Linf eps {'of the trial' if eps is None else f'{eps:g}'}, {where}")


CONFIRM_DEFAULT = ConfirmSettings()


def parse_confirm(raw: Any, key: str = "study.confirm") -> ConfirmSettings:
    """study.confirm: {points, steps, restarts, step_size, autoattack, seed}; null = the defaults."""
    if raw is None:
        return CONFIRM_DEFAULT
    return check_confirm(build(ConfirmSettings, raw, key + ".", strict=True), key)


def check_confirm(settings: ConfirmSettings, key: str) -> ConfirmSettings:
    """The cross-field check of confirmation settings (`key`: the section, for the message)."""
    if 0 < settings.step_size * settings.steps < 1:
        raise ConfigError(f"{key}.step_size", f"{settings.step_size:g} x {settings.steps} steps cannot reach the "
                          "eps-ball boundary; need steps * step_size >= 1 (or 0 = auto, 2.5 / steps)")
    return settings


def _confirm_overrides(raw: Any, key: str) -> dict:
    """study.baselines.confirm: keys of study.confirm changed for the baselines (names, types and ranges checked
    here; the step check once study.confirm is known, StudySettings)."""
    if raw is None:
        return {}
    build(ConfirmSettings, raw, key + ".", strict=True)
    return dict(raw)


@dataclass(frozen=True)
class BaselineSettings:
    """`study.baselines` (off by default): after the front's test confirmation, the LWM baseline at the front's
    sizes (study.search.front.baselines): one LWM run per distinct front configuration (same keep fraction, attack and
    fine-tuning; magnitude masks, no score training), validated like a trial and confirmed on the TEST split.

    `true` (or `{}`) confirms the baselines exactly like the front (study.confirm); `confirm:` changes keys of
    study.confirm for the baselines only, e.g. `{autoattack: false}`: the same PGD on the same test points,
    comparable with the front's `test_pgd_acc`, without AutoAttack's cost."""

    confirm: dict = field(default_factory=dict, metadata={"parse": _confirm_overrides})

    def confirm_settings(self, front: ConfirmSettings) -> ConfirmSettings:
        """The baselines' confirmation: the front's (study.confirm) with `confirm`'s keys changed."""
        return dataclasses.replace(front, **self.confirm)


def parse_baselines(raw: Any, key: str = "study.baselines") -> BaselineSettings | None:
    """study.baselines: false/null (off, the default), true (on, confirmed like the front) or {confirm: {...}}."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return BaselineSettings()
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected true, false or a section {{confirm: {{...}}}}, got {raw!r}; valid keys: "
                          f"{', '.join(f.name for f in dataclasses.fields(BaselineSettings))}")
    return build(BaselineSettings, raw, key + ".", strict=True)


@dataclass(frozen=True)
class RobustnessSettings:
    # threat -> sorted eps list
    threats: dict = field(default_factory=dict, metadata={
        "parse": _threats, "required": f"threat -> eps list, threats among {', '.join(THREATS)}"})
    scenario_r: tuple = field(default=DEFAULT_R, metadata={"parse": _fractions})
    search_budget: Budget = field(default=SEARCH_DEFAULT, metadata={"parse": _budget(SEARCH_DEFAULT, final=False)})
    final_budget: Budget = field(default=FINAL_DEFAULT, metadata={"parse": _budget(FINAL_DEFAULT, final=True)})

    def __post_init__(self) -> None:
        for t in self.final_budget.autoattack_eps or {}:
            if t not in AA_THREATS or t not in self.threats:
                choices = [a for a in AA_THREATS if a in self.threats]
                raise ConfigError(f"final_budget.autoattack_eps.{t}", "AutoAttack runs on an evaluated threat among "
                                  f"{', '.join(AA_THREATS)}; valid choices: "
                                  f"{', '.join(choices) or '(none: add linf or l2 to threats)'}")

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
                out += [suite_metric("robust", t, e), suite_metric("robust_nested", t, e)]
                out += [suite_metric("scenario", t, e, r) for r in self.scenario_r]
        return out


def parse_robustness(raw: Any, key: str = "study.robustness") -> RobustnessSettings:
    return build(RobustnessSettings, raw, key + ".", strict=True)


def is_suite_name(name: str) -> bool:
    """Shaped like a suite metric (robust.*, robust_nested.*, auc.*, scenario.*, autoattack.*)."""
    return name.partition(".")[0] in SUITE_PREFIXES and "." in name


def canonical_metric(name: str, settings: RobustnessSettings | None) -> str | None:
    """The suite's own name of objective `name` (`robust.l2.1.0` -> `robust.l2.1`), or None when `name`
    is not shaped like a suite metric. Raises ValueError (the caller names the objective's key) when it is
    shaped like one but the section does not evaluate it."""
    family, _, rest = name.partition(".")
    if family not in SUITE_PREFIXES:
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
        eps = float(eps_text)
        r = float(r_text) if r_text is not None else None
    except ValueError:
        raise ValueError(f"cannot read the eps (or r) of {name!r}; valid suite metrics: {shown}") from None
    if fmt(eps) not in {fmt(e) for e in settings.threats[threat]}:
        raise ValueError(f"eps {eps_text} is not in study.robustness.threats.{threat} "
                         f"({', '.join(fmt(e) for e in settings.threats[threat])}); valid suite metrics: {shown}")
    if r is not None and fmt(r) not in {fmt(x) for x in settings.scenario_r}:
        raise ValueError(f"r {r_text} is not in study.robustness.scenario_r "
                         f"({', '.join(fmt(x) for x in settings.scenario_r)}); valid suite metrics: {shown}")
    return suite_metric(family, threat, eps, r)
