"""The files a front trial's test-split evaluation leaves in trials/<n>/, and the Pareto table's test columns.

confirm.json (study.confirm: budget, eps, `test_attack`, the `test_*` metrics) and robustness_final.json
(study.robustness's final budget: the suite's report and its `test.` metrics) are written atomically and
reused while their settings are unchanged (a resume or `study report` does not redo them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from study.keys import TEST_PREFIX
from study.search.folder.layout import CONFIRM_FILE, SUITE_FINAL_FILE
from study.search.front.robust_settings import Budget, ConfirmSettings

# The confirmation's figures (study.confirm), in column order; `test_attack` names attack and budget.
TEST_METRICS = ("test_clean_acc", "test_robust_acc", "test_pgd_acc", "test_autoattack_acc", "test_points")


def final_metrics(report: Any) -> dict[str, float]:
    return {TEST_PREFIX + k: float(v) for k, v in report.flat_metrics().items() if math.isfinite(v)}


def front_columns(final: Mapping[str, float], objectives: Sequence[str]) -> dict[str, float]:
    """The suite's test metrics worth a column of the Pareto table/CSV: clean, robust per eps, AUC,
    AutoAttack, the objectives' own test figures, suspect."""
    p = TEST_PREFIX
    keep = (f"{p}clean_acc", f"{p}suspect")
    out = {k: v for k, v in final.items()
           if k in keep or k.startswith((f"{p}robust.", f"{p}auc.", f"{p}autoattack."))
           or k[len(p):] in objectives}
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == f"{p}suspect", kv[0])))


def terminal_column(key: str, objectives: Sequence[str], row: Mapping[str, Any] = {}) -> bool:
    """The test columns printed in the terminal table (the CSV has them all): the confirmation's clean and
    robust figures (its attack is named in a line above the table), the suite's test figures of the
    objectives, AutoAttack and the PGD figure beside it, suspect."""
    p = TEST_PREFIX
    if key.startswith("test_"):
        return key in ("test_clean_acc", "test_robust_acc")
    name = key[len(p):]
    return (not key.startswith(p) or key == f"{p}suspect" or name.startswith("autoattack.")
            or name in objectives or (name.startswith("robust.") and f"{p}autoattack.{name[7:]}" in row))


def save_final(directory: str | Path, report: Any, budget: Budget) -> Path:
    path = Path(directory) / SUITE_FINAL_FILE
    payload = {"budget": dataclasses.asdict(budget), "report": report.to_dict(), "metrics": final_metrics(report),
               "failed_checks": [c.name for c in report.checks if not c.passed]}
    return _write_json(path, payload)


def load_final(directory: str | Path, budget: Budget | None = None) -> dict | None:
    """A trial's saved final evaluation (None if absent, or run with another budget than `budget`)."""
    return _read_json(Path(directory) / SUITE_FINAL_FILE, budget)


def _write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(payload), indent=2))
    os.replace(tmp, path)
    return path


def _read_json(path: Path, budget: Any = None) -> dict | None:
    """A saved evaluation, or None if absent, unreadable, or made with another budget than `budget`."""
    from analysis.report_data import read_json

    payload = read_json(path) if path.is_file() else None  # a damaged file: one warning, read as absent
    if payload is None:
        return None
    if budget is not None and payload.get("budget") != json.loads(json.dumps(dataclasses.asdict(budget))):
        return None
    return payload


def save_confirm(directory: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write trials/<n>/confirm.json atomically."""
    return _write_json(Path(directory) / CONFIRM_FILE, payload)


def load_confirm(directory: str | Path, settings: ConfirmSettings | None = None) -> dict | None:
    """A trial's saved confirmation (None if absent, unreadable, or run with other settings)."""
    return _read_json(Path(directory) / CONFIRM_FILE, settings)


def confirm_columns(payload: Mapping[str, Any], path: Path | str = CONFIRM_FILE) -> dict[str, Any]:
    """The Pareto row's columns of a saved confirmation (read from `path`): its finite test_* figures (another
    value is left out with a warning) and `test_attack`."""
    from analysis.report_data import finite_figures

    m = payload.get("metrics") if isinstance(payload.get("metrics"), dict) else {}
    out: dict[str, Any] = finite_figures({k: m[k] for k in TEST_METRICS if k in m}, path)
    attack = payload.get("test_attack")
    out["test_attack"] = attack if isinstance(attack, str) else ""
    return out


