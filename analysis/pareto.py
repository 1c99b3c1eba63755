"""Pareto fronts of a study: non-dominated filtering, hypervolume, a printed table and a CSV file.

Reads only Optuna objects (a Study or FrozenTrials), so it works on a live study, a finished one, or
fake trials built with `optuna.trial.create_trial` in tests. Trials with identical objective vectors
are all kept, as Optuna's `Study.best_trials` keeps them.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Columns of the table, in order; the objectives and the searched params are added where missing. The val_*
# figures come from the trials (selection); the test_* ones from the front's confirmation (study.confirm),
# added by the study from trials/<n>/confirm.json: they never pass through Optuna.
BASE_COLUMNS = ("trial", "params_kept", "compression", "val_clean_acc", "val_robust_acc", "test_clean_acc",
                "test_robust_acc")


def to_minimization(values: Any, modes: Sequence[str]) -> np.ndarray:
    """(n, m) values with every `max` column negated, so that smaller is better everywhere."""
    pts = np.asarray(values, dtype=float).reshape(-1, len(modes))
    signs = np.array([-1.0 if m in ("max", "maximize") else 1.0 for m in modes])
    return pts * signs


def non_dominated(values: Any, modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (<= everywhere, < somewhere)."""
    pts = to_minimization(values, modes)
    if len(pts) == 0:
        return np.zeros(0, dtype=bool)
    no_worse = (pts[:, None, :] <= pts[None, :, :]).all(-1)  # [j, i]: j is nowhere worse than i
    better = (pts[:, None, :] < pts[None, :, :]).any(-1)
    dominated = (no_worse & better).any(0)
    return ~dominated


def pareto_ranks(values: Any, modes: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: rank 0 for the non-dominated points, rank 1 for those only rank-0 points
    dominate, and so on (int array, one rank per point)."""
    pts = to_minimization(values, modes)
    ranks = np.full(len(pts), -1, dtype=int)
    left = np.arange(len(pts))
    rank = 0
    while len(left):
        mask = non_dominated(pts[left], ["min"] * pts.shape[1])
        ranks[left[mask]] = rank
        left = left[~mask]
        rank += 1
    return ranks


def hypervolume(values: Any, modes: Sequence[str], ref: Sequence[float]) -> float:
    """Hypervolume (moocore) of the points against the reference point `ref` (in the raw units)."""
    pts = np.asarray(values, dtype=float).reshape(-1, len(modes))
    keep = non_dominated(pts, modes)
    if not keep.any():
        return 0.0
    import moocore

    maximise = [m in ("max", "maximize") for m in modes]
    return float(moocore.hypervolume(pts[keep], ref=np.asarray(ref, dtype=float), maximise=maximise))


def default_reference(values: Any, modes: Sequence[str]) -> list[float]:
    """0 for maximized metrics (accuracies), 1.1 x the worst value for minimized ones (sizes)."""
    pts = np.asarray(values, dtype=float).reshape(-1, len(modes))
    return [0.0 if m in ("max", "maximize") else 1.1 * float(pts[:, i].max()) for i, m in enumerate(modes)]


# ---------------------------------------------------------------------------------------------------
# Optuna studies.


def _modes(study: Any) -> list[str]:
    return ["max" if d.name == "MAXIMIZE" else "min" for d in study.directions]


def complete_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and all(math.isfinite(v) for v in t.values)]


def front_trials(study: Any) -> list[Any]:
    """The study's non-dominated COMPLETE trials, by trial number (equals `study.best_trials`)."""
    trials = complete_trials(study)
    if not trials:
        return []
    mask = non_dominated([t.values for t in trials], _modes(study))
    return sorted((t for t, keep in zip(trials, mask) if keep), key=lambda t: t.number)


def trial_row(trial: Any, metrics: Sequence[str]) -> dict[str, Any]:
    """One table/CSV row: trial number, objectives and final metrics, params, MLflow run id."""
    attrs = trial.user_attrs
    row: dict[str, Any] = {"trial": trial.number}
    for name in BASE_COLUMNS[1:]:
        if name in attrs:
            row[name] = attrs[name]
    for name, value in zip(metrics, trial.values or ()):
        row[name] = value
    row.update({k: v for k, v in sorted(trial.params.items())})
    row["mlflow_run_id"] = attrs.get("mlflow_run_id", "")
    return row


def front_rows(study: Any, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the Pareto front, smallest first objective first."""
    modes = _modes(study)
    rows = [trial_row(t, metrics) for t in front_trials(study)]
    sign = -1.0 if modes and modes[0] == "max" else 1.0
    return sorted(rows, key=lambda r: (sign * float(r.get(metrics[0], 0.0)), r["trial"]))


def study_hypervolume(study: Any) -> float:
    trials = complete_trials(study)
    if not trials:
        return 0.0
    values, modes = [t.values for t in trials], _modes(study)
    return hypervolume(values, modes, default_reference(values, modes))


# ---------------------------------------------------------------------------------------------------
# Output.


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    front = [c for c in BASE_COLUMNS if c in cols]
    tail = [c for c in ("params", "test_attack", "mlflow_run_id") if c in cols]
    return front + [c for c in cols if c not in front and c not in tail] + tail


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1000:
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def compact_params(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with the searched params folded into one short `params` column (for the terminal)."""
    shorts = [k.rpartition(".")[2] for k in keys]
    names = {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts)}
    out = []
    for row in rows:
        new = {k: v for k, v in row.items() if k not in names}
        new["params"] = " ".join(f"{names[k]}={_fmt(row[k])}" for k in keys if k in row)
        if "mlflow_run_id" in new:
            new["mlflow_run_id"] = new.pop("mlflow_run_id")
        out.append(new)
    return out


def format_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """A plain-text table; numbers at 4 significant digits."""
    if not rows:
        return (title + "\n" if title else "") + "(no COMPLETE trial: the Pareto front is empty)"
    cols = columns_of(rows)
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = columns_of(rows) if rows else list(BASE_COLUMNS) + ["mlflow_run_id"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in cols})
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
