"""The one typed entry point: `evaluate_robustness(model, x, y, threats=..., budget=...)`.

RobustBench's rule, made code: the unsafe evaluation is impossible. An eps list is required per threat,
a model left in train mode is evaluated in eval mode (with a warning) and put back, every number comes
from the same seeded points, the caller's RNG state is restored, and the Carlini et al. sanity checks
travel with the numbers (`report.suspect`).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from study.keys import suite_metric
from study.robustness import checks as C
from study.robustness.attacks import BLACK_BOX, CURVE, PRIMARY, attack, correct
from study.robustness.autoattack import autoattack as run_autoattack
from study.robustness.curves import Curve, from_flags
from study.robustness.progress import Sink
from study.robustness.scenario import ScenarioRow, TransferResult, scenario_table, transfer
from study.robustness.threats import AUTOATTACK_NORMS as AA_THREATS
from study.robustness.threats import Threat


@dataclass(frozen=True)
class EvalBudget:
    points: int = 512          # fixed evaluation points: the first `points` of a seeded permutation of x
    steps: int = 50            # iterations of every gradient attack (PGD, APGD, PGD0)
    restarts: int = 2          # random restarts (PGD/PGD0: per-point worst over restarts; APGD: n_restarts)
    seed: int = 0              # points, random starts and query draws all derive from it
    batch_size: int = 256      # points per attack batch
    square_queries: int = 1000  # queries of the black-box attacks: Square (check 4), Sparse-RS (L0 curve)

    def __post_init__(self) -> None:
        for k in ("points", "steps", "restarts", "batch_size", "square_queries"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"EvalBudget.{k} must be >= 1, got {getattr(self, k)}")


@dataclass(frozen=True)
class AutoAttackResult:
    threat: str
    eps: float
    robust_acc: float         # standard AutoAttack
    pgd_acc: float            # the threat's PGD alone, same points and eps
    white_box_acc: float      # the curve's figure (per-point worst over PGD and APGD-CE)
    wall_s: float
    flags: list[str] = field(default_factory=list)  # AutoAttack's own warnings, one per kind


@dataclass
class RobustnessReport:
    n_points: int
    seed: int
    clean_acc: float                      # on the evaluated points
    clean_acc_all: float                  # on all of x
    curves: dict[str, Curve]
    checks: list[C.Check]
    autoattack: list[AutoAttackResult] = field(default_factory=list)
    transfer: list[TransferResult] = field(default_factory=list)
    scenario: list[ScenarioRow] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    budget: EvalBudget = field(default_factory=EvalBudget)

    @property
    def suspect(self) -> bool:
        """Any sanity check failed: possible gradient masking or a broken evaluation."""
        return any(not c.passed for c in self.checks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["suspect"] = self.suspect
        for name, c in self.curves.items():
            d["curves"][name]["running_min"] = c.running_min
        _assert_finite(d)
        return d

    def flat_metrics(self) -> dict[str, float]:
        """Flat dotted names -> floats for MLflow, e.g. robust.linf.0.0314, auc.l2, check.monotone."""
        m: dict[str, float] = {"clean_acc": self.clean_acc, "clean_acc_all": self.clean_acc_all,
                               "n_points": float(self.n_points), "suspect": float(self.suspect)}
        for t, c in self.curves.items():
            m[f"auc.{t}"] = c.auc
            for i, e in enumerate(c.eps):
                m[suite_metric("robust", t, e)] = c.robust_acc[i]
                m[suite_metric("robust_nested", t, e)] = c.robust_acc_nested[i]
                for a, acc in c.per_attack.items():
                    m[suite_metric(f"attack.{t}", a, e)] = acc[i]
        for c in self.checks:
            kind = c.name.split(".")[0]
            m[f"check.{c.name}"] = float(c.passed)
            m[f"check.{kind}"] = min(m.get(f"check.{kind}", 1.0), float(c.passed))
        for a in self.autoattack:
            m[suite_metric("autoattack", a.threat, a.eps)] = a.robust_acc
        for tr in self.transfer:
            for e, acc in zip(tr.eps, tr.target_acc):
                m[suite_metric("transfer", tr.threat, e)] = acc
        for row in self.scenario:
            m[suite_metric("scenario", row.threat, row.eps, row.r)] = row.accuracy
        for k, v in self.wall_s.items():
            m[f"wall_s.{k}"] = v
        return m

    def table(self) -> str:
        """A printable text report: curves, AutoAttack beside PGD, transfer, checks, wall times."""
        out = [f"robustness on {self.n_points} fixed points (seed {self.seed}): clean {self.clean_acc:.4f} "
               f"(all {self.clean_acc_all:.4f})" + ("   ** SUSPECT: a sanity check failed **" if self.suspect else "")]
        for t, c in self.curves.items():
            attacks = list(c.per_attack)
            out.append(f"\n[{t}] eps unit: {c.unit}; AUC (normalised) {c.auc:.4f}; wall {self.wall_s.get(t, 0):.1f}s")
            out.append(f"  {'eps':>10} {'robust':>8} {'nested':>8} " + " ".join(f"{a:>13}" for a in attacks))
            for i, e in enumerate(c.eps):
                out.append(f"  {e:>10.5g} {c.robust_acc[i]:>8.4f} {c.robust_acc_nested[i]:>8.4f} "
                           + " ".join(f"{c.per_attack[a][i]:>13.4f}" for a in attacks))
        if self.autoattack:
            out.append("\nAutoAttack (standard) vs PGD, same points")
            out.append(f"  {'threat':>6} {'eps':>10} {'AA':>8} {'PGD':>8} {'PGD+APGD':>9} {'wall_s':>8}")
            out += [f"  {a.threat:>6} {a.eps:>10.5g} {a.robust_acc:>8.4f} {a.pgd_acc:>8.4f} {a.white_box_acc:>9.4f} "
                    f"{a.wall_s:>8.1f}" for a in self.autoattack]
            out += [f"  AutoAttack warning ({a.threat} {a.eps:g}): {m}" for a in self.autoattack for m in a.flags]
        if self.transfer:
            out.append("\ntransfer (crafted on the reference model)")
            out.append(f"  {'threat':>6} {'eps':>10} {'reference':>9} {'this model':>10}")
            out += [f"  {tr.threat:>6} {e:>10.5g} {s:>9.4f} {g:>10.4f}" for tr in self.transfer
                    for e, s, g in zip(tr.eps, tr.source_acc, tr.target_acc)]
        out.append("\nsanity checks")
        out += [f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<18} {c.detail}" for c in self.checks]
        out.append("\nwall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.wall_s.items()))
        return "\n".join(out)


def evaluate_robustness(model: nn.Module, x: Tensor, y: Tensor, *, threats: dict[str, list[float]],
                        budget: EvalBudget, autoattack: bool = False, reference_model: nn.Module | None = None,
                        scenario_r: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0),
                        device: torch.device | str | None = None,
                        autoattack_eps: dict[str, list[float]] | None = None,
                        progress: Sink | None = None) -> RobustnessReport:
    """Clean accuracy, robustness curves, sanity checks and (optionally) AutoAttack and transfer results
    for `model` (images in [0, 1] -> logits) on `budget.points` seeded points of (x, y).

    threats: threat name ('linf', 'l2', 'l0') -> eps list in that threat's unit (see Threat.unit).
    autoattack_eps: where AutoAttack runs (default: every eps > 0 of linf and l2).
    progress: AutoAttack's progress per batch of points (study.robustness.progress).
    """
    spec = _validate(threats, x, y, scenario_r)
    aa_spec = _validate_aa(autoattack_eps, spec) if autoattack else {}
    if not isinstance(budget, EvalBudget):
        raise TypeError("budget must be an EvalBudget")
    dev = torch.device(device) if device is not None else _device_of(model)
    for m, what in ((model, "model"), (reference_model, "reference_model")):
        if m is not None and m.training:
            warnings.warn(f"{what} was in train mode; evaluating it in eval mode and restoring train mode after",
                          stacklevel=2)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(_eval_mode(model))
        if reference_model is not None:
            stack.enter_context(_eval_mode(reference_model))
        report = _evaluate(model, x, y, spec, budget, aa_spec, reference_model, list(scenario_r), dev, progress)
    report.wall_s["total"] = time.perf_counter() - start
    return report


def _evaluate(model, x, y, spec: dict[Threat, list[float]], b: EvalBudget, aa_spec: dict[Threat, list[float]],
              reference, rs: list[float], dev: torch.device, progress: Sink | None = None) -> RobustnessReport:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(b.seed))[: b.points]
    xs, ys = x[perm].to(dev), y[perm].to(dev)
    kw = dict(steps=b.steps, restarts=b.restarts, seed=b.seed, queries=b.square_queries, batch_size=b.batch_size)
    clean_flags = correct(model, xs, ys, b.batch_size)
    clean = float(clean_flags.float().mean())
    clean_all = float(torch.cat([correct(model, x[s:s + b.batch_size].to(dev), y[s:s + b.batch_size].to(dev))
                                 for s in range(0, len(x), b.batch_size)]).float().mean())
    report = RobustnessReport(len(xs), b.seed, clean, clean_all, {}, [], budget=b)
    acc = lambda name, t, e, **over: float(correct(model, attack(name, model, xs, ys, e, **{**kw, **over}), ys,
                                                   b.batch_size).float().mean())

    for t, eps in spec.items():
        t0 = time.perf_counter()
        names = CURVE[t]
        flags = {a: torch.stack([correct(model, attack(a, model, xs, ys, e, **kw), ys, b.batch_size) for e in eps])
                 for a in names}
        worst = torch.stack(list(flags.values())).all(0)
        curve = from_flags(t.value, t.unit, eps, worst, {a: f.float().mean(1).tolist() for a, f in flags.items()})
        report.curves[t.value] = curve
        report.wall_s[t.value] = time.perf_counter() - t0

        t0 = time.perf_counter()
        report.checks += _checks(model, t, curve, xs, ys, clean, acc, b)
        report.wall_s[f"checks.{t.value}"] = time.perf_counter() - t0

    tol = C.tolerance(len(xs))
    for t, aa_eps in aa_spec.items():
        c = report.curves[t.value]
        for e in aa_eps:
            t0 = time.perf_counter()
            aa_flags, messages = run_autoattack(model, xs, ys, t, e, seed=b.seed, batch_size=b.batch_size,
                                                progress=progress)
            wall = time.perf_counter() - t0
            aa = float(aa_flags.float().mean())
            pgd = c.per_attack[PRIMARY[t]][c.eps.index(e)] if e in c.eps else acc(PRIMARY[t], t, e)
            wb = c.robust_acc[c.eps.index(e)] if e in c.eps else pgd
            report.autoattack.append(AutoAttackResult(t.value, e, aa, pgd, wb, wall, messages))
            report.wall_s[suite_metric("autoattack", t.value, e)] = wall
            report.checks.append(C.Check(f"autoattack.{t.value}", aa >= wb - tol,
                                         f"eps {e:g}: AutoAttack {aa:.3f} vs PGD+APGD {wb:.3f} (tol {tol:.3f})"))

    if reference is not None:
        t0 = time.perf_counter()
        report.transfer = [transfer(reference, model, xs, ys, t, eps, **kw) for t, eps in spec.items()]
        report.wall_s["transfer"] = time.perf_counter() - t0

    report.scenario = scenario_table(clean, {t: (c.eps, c.robust_acc) for t, c in report.curves.items()}, rs)
    return report


def _checks(model, t: Threat, curve: Curve, xs, ys, clean: float, acc, b: EvalBudget) -> list[C.Check]:
    n, name = len(xs), t.value
    out = [C.eps_zero(name, clean, curve.at(0.0) if 0.0 in curve.eps else acc(PRIMARY[t], t, 0.0)),
           C.monotone(name, curve.eps, curve.robust_acc, n)]
    big = t.large_eps(xs)
    e_big = curve.eps[-1] if curve.eps[-1] >= big else big
    a_big = curve.robust_acc[-1] if curve.eps[-1] >= big else acc(PRIMARY[t], t, big)
    with torch.no_grad():
        n_cls = model(xs[:1]).shape[1]
    chance = max(1.0 / n_cls, float(torch.bincount(ys).max()) / n)
    out.append(C.reaches_chance(name, e_big, a_big, chance, n))
    nonzero = [(e, a) for e, a in zip(curve.eps, curve.robust_acc) if e > 0]
    if not nonzero:
        return out + [C.skipped(f"effort.{name}", "no eps > 0"), C.skipped(f"black_box.{name}", "no eps > 0")]
    e_mid, a_mid = min(nonzero, key=lambda ea: abs(ea[1] - clean / 2))  # the most informative eps
    base = curve.per_attack[PRIMARY[t]][curve.eps.index(e_mid)]
    strong = acc(PRIMARY[t], t, e_mid, steps=2 * b.steps, restarts=b.restarts + 1)
    effort = f"{PRIMARY[t]} {2 * b.steps} steps x {b.restarts + 1} restarts"
    out.append(C.more_effort(name, e_mid, base, strong, effort, n, a_mid))
    if t not in BLACK_BOX:
        return out + [C.skipped(f"black_box.{name}", "the black-box Sparse-RS is part of the L0 curve")]
    black = acc(BLACK_BOX[t], t, e_mid)
    out.append(C.black_box(name, e_mid, a_mid, black, f"{BLACK_BOX[t]} ({b.square_queries} queries)", n))
    return out


def _validate_aa(aa_eps: dict[str, list[float]] | None, spec: dict[Threat, list[float]]) -> dict[Threat, list[float]]:
    """Where AutoAttack runs: the given eps, or every eps > 0 of the curve's linf and l2 threats."""
    if aa_eps is None:
        return {t: [e for e in eps if e > 0] for t, eps in spec.items() if t in AA_THREATS}
    out = {}
    for name, eps in aa_eps.items():
        t = Threat.parse(name)
        if t not in AA_THREATS or t not in spec:
            raise ValueError(f"autoattack_eps: {t.value!r} must be one of the evaluated threats among "
                             f"{', '.join(a.value for a in AA_THREATS)}")
        out[t] = t.validate_eps(eps)
    return out


def _validate(threats, x: Tensor, y: Tensor, rs) -> dict[Threat, list[float]]:
    if not isinstance(threats, dict) or not threats:
        raise ValueError("threats must be a non-empty dict threat -> eps list, e.g. {'linf': [0, 2/255, 8/255]}; "
                         f"valid threats: {', '.join(t.value for t in Threat)}")
    spec = {}
    for name, eps in threats.items():
        t = Threat.parse(name)
        if t in spec:
            raise ValueError(f"threat {t.value!r} given twice")
        spec[t] = t.validate_eps(eps)
    if not (x.is_floating_point() and x.dim() == 4):
        raise ValueError(f"x must be float NCHW images in [0, 1], got {x.dtype} {tuple(x.shape)}")
    if len(x) == 0 or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("x must be non-empty with values in [0, 1] (normalization belongs inside the model)")
    if y.dtype != torch.int64 or y.shape != (len(x),):
        raise ValueError(f"y must be int64 labels of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    for r in rs:
        if not 0 <= r <= 1:
            raise ValueError(f"scenario_r values must be in [0, 1], got {r}")
    return spec


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _assert_finite(obj, path: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value at {path}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_finite(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_finite(v, f"{path}[{i}]")
