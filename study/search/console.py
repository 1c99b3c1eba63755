"""What a study prints in the terminal: the Pareto front, the suite's sanity checks, how to look at it."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from study.search.folder.layout import Manifest, StudyPaths


def print_front(name: str, rows: list[dict], keys: list[str], complete: int, failed: int, hv: float, csv: Path | None,
                attacks: Sequence[str] = ()) -> None:
    from analysis import pareto

    title = (f"\nPareto front of study '{name}': {len(rows)} of {complete} complete trials "
             f"({failed} failed); hypervolume {hv:.4g}")
    title += "\nselected on the validation split (val_*)"
    if attacks:
        title += ("; test_* = the chosen models on the TEST split, test_robust_acc = per-point worst case of "
                  + " | ".join(attacks))
    else:
        title += "; no test-split figures yet (study resume runs the confirmation)" if rows else ""
    print(pareto.format_table(pareto.compact_params(rows, keys), title=title))
    print(f"written to {csv}" if csv is not None else "(not written: the study folder is read-only)", flush=True)


def print_final_checks(finals: Mapping[int, dict], robustness: Any) -> None:
    """One line per evaluated front trial: the sanity checks of its final robustness evaluation."""
    budget = robustness.final_budget.text() if robustness is not None else ""
    print(f"\nrobustness suite on the test split ({budget}): sanity checks")
    for number, payload in sorted(finals.items()):
        failed = payload.get("failed_checks") or []
        print(f"  trial {number}: " + (f"SUSPECT, failed: {', '.join(failed)}" if failed else "all checks passed"))
    print("  (a failed check flags possible gradient masking or a broken evaluation: see docs/robustness.md)", flush=True)


MLFLOW_UI = "http://127.0.0.1:5000"


def mlflow_page(experiment_id: str | None, base: str = MLFLOW_UI) -> str:
    """The experiment's runs in MLflow's UI at `base`. MLflow 3's UI opens the GenAI overview of an experiment
    unless workflowType=machine_learning says otherwise."""
    if not experiment_id:
        return f"{base}/#/experiments"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def print_viewers(paths: StudyPaths, manifest: Manifest, metrics: list[str], experiment_id: str | None = None) -> None:
    store = manifest.storage
    dash = store[len("journal:"):] if store.startswith("journal:") else store
    cols = ",".join(["trial_id", *metrics[:2], "config/prune.keep_fraction"])  # fits 80 columns
    ui = (f"    mlflow ui --backend-store-uri {manifest.tracking_uri}\n"
          f"      then open {mlflow_page(experiment_id)}\n"
          if not manifest.tracking_uri.startswith(("http://", "https://")) else
          f"    open {manifest.tracking_uri.rstrip('/')}/#/experiments/{experiment_id or ''}"
          f"{'/runs?workflowType=machine_learning' if experiment_id else ''}\n")
    print("\nLook at it with:\n" + ui +
          f"    optuna-dashboard {dash}\n"
          f"    tune ls {paths.experiment_location} --columns {cols}", flush=True)
    if paths.remote:
        print(f"The study's files are in {paths.location()} (this machine keeps a copy in {paths.root}).", flush=True)


def print_interrupted(name: str, done: int, n_trials: int, runs_dir: str | None) -> None:
    print(f"\n[study] {name}: interrupted after {done} of {n_trials} trials. Continue with:\n"
          f"    study resume {name}" + (f" --runs-dir {runs_dir}" if runs_dir else ""), flush=True)


def print_progress(label: str, update: Any) -> None:
    """One progress line of a long evaluation (a study.robustness.progress.Update), on stderr beside the
    log: e.g. "[study] confirming trial 12 (2/3): AutoAttack standard Linf eps=0.1, apgd-t (2/4): 256/300
    points, 41 s, ETA 17 s"."""
    print(f"[study] {label}: {update.text()}", file=sys.stderr, flush=True)
