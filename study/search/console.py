"""What a study prints in the terminal: the Pareto front, the suite's sanity checks, how to look at it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from study.search.layout import Manifest, StudyPaths


def print_front(name: str, rows: list[dict], keys: list[str], complete: int, failed: int, hv: float, csv: Path,
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
    print(f"written to {csv}", flush=True)


def print_final_checks(finals: Mapping[int, dict], robustness: Any) -> None:
    """One line per evaluated front trial: the sanity checks of its final robustness evaluation."""
    budget = robustness.final_budget.text() if robustness is not None else ""
    print(f"\nrobustness suite on the test split ({budget}): sanity checks")
    for number, payload in sorted(finals.items()):
        failed = payload.get("failed_checks") or []
        print(f"  trial {number}: " + (f"SUSPECT, failed: {', '.join(failed)}" if failed else "all checks passed"))
    print("  (a failed check flags possible gradient masking or a broken evaluation: see docs/robustness.md)", flush=True)


def print_viewers(paths: StudyPaths, manifest: Manifest, metrics: list[str]) -> None:
    store = manifest.storage
    dash = store[len("journal:"):] if store.startswith("journal:") else store
    cols = ",".join(["trial_id", *metrics[:2], "config/prune.keep_fraction"])  # fits 80 columns
    print("\nLook at it with:\n"
          f"    mlflow ui --backend-store-uri {manifest.tracking_uri}\n"
          f"    optuna-dashboard {dash}\n"
          f"    tune ls {paths.experiment} --columns {cols}", flush=True)


def print_interrupted(name: str, done: int, n_trials: int, runs_dir: str | None) -> None:
    print(f"\n[study] {name}: interrupted after {done} of {n_trials} trials. Continue with:\n"
          f"    study resume {name}" + (f" --runs-dir {runs_dir}" if runs_dir else ""), flush=True)
