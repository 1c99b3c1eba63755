"""A table of real trials of the quickstart space, made once, for the search benchmark to replay.

    python -m analysis.experiments.search_table                # the full table (resumable; ~4 CPU-hours)
    python -m analysis.experiments.search_table --workers 2    # two trials at a time (one CPU thread each)
    python -m analysis.experiments.search_table --quick        # 2 cells, tiny budgets (a smoke run)

Every row is one real trial through the project's pipeline (study.trial.pipeline.run_trial: PGD pre-training
once per trial seed, HYDRA score training, adversarial fine-tuning, validation PGD), then its test figures
(PGD-10 on the whole test split), which only the benchmark's reported fronts read. The cells are the
quickstart space (search_spaces/quickstart.yaml) snapped to levels: every continuous key is cut to a few
levels (`LEVELS`); a sampler's suggestion is snapped to the nearest level (in log space for log keys) when the
benchmark replays it. Snapping rather than a surrogate: the replay then returns only figures a real trial
produced, and the trial-to-trial noise is the measured one (each cell is run with `SEEDS` trial seeds; the
replay draws one of them), where a surrogate would have to model that noise.

Table settings differ from the quickstart's in what the benchmark needs: a validation split of 30% of the
training images (431 points, one standard error about 2 points at 0.8 accuracy, where the quickstart's 256 points
give 2.5 and the earlier 144-point experiment 3.3), the whole split evaluated every epoch (per-epoch figures
are the rungs of multi-fidelity) and 3 + 3 epochs (prune, fine-tune), so that a rung can stop a trial early.

Rows are appended one per trial as each ends (flushed): a killed run loses at most the trials in flight, and
rerunning the command continues. The file is CSV, read as text: nothing in it is executed.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from analysis.experiments import common
from analysis.experiments.common import ROOT

SPACE = ROOT / "search_spaces" / "quickstart.yaml"
TABLE = ROOT / "docs" / "results" / "search_table.csv"
SEEDS = (0, 1)
EPOCHS = {"prune_stage.epochs": 3, "finetune.epochs": 3}

# The levels every searched key is snapped to. keep_fraction: 6 log-spaced levels over the space's
# [0.02, 0.5]; warmup_fraction: the middle of its range (one level: the schedule's shape is the choice
# the table resolves); eps_multiplier and steps: both ends of their ranges.
LEVELS: dict[str, tuple] = {
    "prune.keep_fraction": tuple(round(0.02 * (0.5 / 0.02) ** (i / 5), 4) for i in range(6)),
    "prune.score_init": ("ssi", "kaiming_normal", "snip"),
    "attack.schedule": ("constant", "linear", "cosine", "step"),
    "attack.warmup_fraction": (0.3,),
    "attack.eps_multiplier": (0.75, 1.25),
    "attack.steps": (1, 5),
}
LOG_KEYS = ("prune.keep_fraction",)
CONDITIONAL = {"attack.warmup_fraction": ("attack.schedule", ("linear", "cosine", "step"))}

TABLE_SETTINGS: dict[str, Any] = {
    **EPOCHS,
    "data.val_fraction": 0.3,
    "eval.val_points": 0, "eval.val_steps": 5,  # every epoch: PGD-5 on the whole validation split
    "eval.points": 0, "eval.steps": 10, "eval.restarts": 1,  # end of trial: PGD-10 on the whole split
}
QUICK_SETTINGS: dict[str, Any] = {
    "prune_stage.epochs": 1, "finetune.epochs": 1, "pretrain.epochs": 1, "data.train_limit": 256,
    "eval.steps": 2, "eval.val_steps": 1,
}
TEST_STEPS = 10
KEY_COLUMNS = [*LEVELS, "trial_seed"]


def cells() -> Iterator[dict[str, Any]]:
    """Every active combination of levels (warmup_fraction only where the schedule uses it)."""
    keys = [k for k in LEVELS if k not in CONDITIONAL]
    for combo in itertools.product(*(LEVELS[k] for k in keys)):
        values = dict(zip(keys, combo))
        for child, (parent, allowed) in CONDITIONAL.items():
            values[child] = LEVELS[child][0] if values[parent] in allowed else ""
        yield values


def snap(key: str, value: Any) -> Any:
    """The table level nearest to a sampler's value (log distance for log keys; categories unchanged)."""
    levels = LEVELS[key]
    if value is None or value == "":
        return ""
    if isinstance(levels[0], str):
        if value not in levels:
            raise ValueError(f"{key}={value!r} is not a table level {levels}")
        return value
    dist = (lambda a: abs(math.log(a) - math.log(value))) if key in LOG_KEYS else (lambda a: abs(a - value))
    return min(levels, key=dist)


def row_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(_text(row.get(k, "")) for k in KEY_COLUMNS)


def _text(v: Any) -> str:
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def read_table(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_cell(values: Mapping[str, Any], seed: int, quick: bool) -> dict[str, Any]:
    """One real trial of the cell, then its test figures. Runs in a worker process (one CPU thread)."""
    import torch

    torch.set_num_threads(1)
    from study.search.front.robust_eval import confirm
    from study.search.front.robust_settings import ConfirmSettings
    from study.search.optimize.space import load_space
    from study.trial.pipeline import run_trial

    space = load_space(SPACE)
    searched = {k: v for k, v in values.items() if v != ""}
    fixed = {**TABLE_SETTINGS, **(QUICK_SETTINGS if quick else {}), "seed": seed,
             "cache_dir": str(ROOT / "runs" / "pretrained")}
    cfg = space.trial_config(searched, fixed)
    t0 = time.perf_counter()
    result = run_trial(cfg)
    wall = time.perf_counter() - t0
    test = confirm(cfg, result.model_state, ConfirmSettings(points=0, steps=TEST_STEPS if not quick else 2,
                                                            restarts=1, step_size=0.0, autoattack=False, seed=0))
    m = result.metrics
    row: dict[str, Any] = {**{k: values[k] for k in LEVELS}, "trial_seed": seed,
                           "params_kept": int(m["params_kept"]), "params_total": int(m["params_total"]),
                           "val_points": int(m["val_points"]), "val_clean_acc": m["val_clean_acc"],
                           "val_robust_acc": m["val_robust_acc"], "test_clean_acc": test["metrics"]["test_clean_acc"],
                           "test_robust_acc": test["metrics"]["test_pgd_acc"],
                           "test_points": int(test["metrics"]["test_points"]), "wall_s": round(wall, 2)}
    for i, h in enumerate(result.history, start=1):  # per-epoch validation figures: the rungs
        row[f"e{i}_val_robust_acc"] = h.get("val_robust_acc", float("nan"))
        row[f"e{i}_val_clean_acc"] = h.get("val_clean_acc", float("nan"))
    return row


def columns(n_epochs: int) -> list[str]:
    per_epoch = [f"e{i}_{m}" for i in range(1, n_epochs + 1) for m in ("val_robust_acc", "val_clean_acc")]
    return [*KEY_COLUMNS, "params_kept", "params_total", "val_points", "val_clean_acc", "val_robust_acc",
            *per_epoch, "test_clean_acc", "test_robust_acc", "test_points", "wall_s"]


def _work(args: tuple[dict[str, Any], int, bool]) -> dict[str, Any]:
    return run_cell(*args)


def build(path: Path, *, workers: int, quick: bool, limit: int | None = None) -> int:
    """Run every (cell, seed) the table lacks; append each row as it ends. Returns the rows written now."""
    n_epochs = 2 if quick else EPOCHS["prune_stage.epochs"] + EPOCHS["finetune.epochs"]
    cols = columns(n_epochs)
    have = read_table(path)
    if have and list(have[0].keys()) != cols:
        raise SystemExit(f"{path}: its columns are not this table's ({len(have[0])} vs {len(cols)}); "
                         "move it away to start a new table")
    done = {row_key(r) for r in have}
    all_cells = list(cells())[: (2 if quick else None)]
    todo = [(c, s, quick) for s in SEEDS for c in all_cells if row_key({**c, "trial_seed": s}) not in done]
    if limit is not None:
        todo = todo[:limit]
    total = len(all_cells) * len(SEEDS)
    common.log_line(f"search table: {len(done)} of {total} trials done, {len(todo)} to run, {workers} at a time")
    if not todo:
        return 0
    # The dense models first, one per trial seed, so parallel workers never race to train one.
    for seed in sorted({s for _, s, _ in todo}):
        _pretrain_only(seed, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    written, t0 = 0, time.time()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        if new_file:
            writer.writeheader()
        for row in _results(todo, workers):
            writer.writerow({k: row.get(k, "") for k in cols})
            f.flush()
            os.fsync(f.fileno())
            written += 1
            rate = (time.time() - t0) / written
            common.log_line(f"  {len(done) + written}/{total}  keep {row['prune.keep_fraction']} "
                            f"{row['prune.score_init']} {row['attack.schedule']}: val robust "
                            f"{float(row['val_robust_acc']):.3f}  ({row['wall_s']} s; about "
                            f"{rate * (len(todo) - written) / 60:.0f} min left)")
    return written


def _pretrain_only(seed: int, quick: bool) -> None:
    from study.search.optimize.space import load_space
    from study.trial.pipeline import pretrain

    space = load_space(SPACE)
    first = next(cells())
    fixed = {**TABLE_SETTINGS, **(QUICK_SETTINGS if quick else {}), "seed": seed,
             "cache_dir": str(ROOT / "runs" / "pretrained")}
    pretrain(space.trial_config({k: v for k, v in first.items() if v != ""}, fixed))


def _results(todo: list, workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for item in todo:
            yield _work(item)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, maxtasksperchild=20) as pool:
        yield from pool.imap_unordered(_work, todo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.experiments.search_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1, help="trials at a time (each one CPU thread)")
    ap.add_argument("--quick", action="store_true", help="2 cells, tiny budgets, into --out (a smoke run)")
    ap.add_argument("--limit", type=int, default=None, help="run at most this many of the missing trials")
    ap.add_argument("--out", type=Path, default=None, help=f"the table file (default {TABLE.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.quick and args.out is None:
        ap.error("--quick needs --out (it never writes the shipped table)")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    build(args.out or TABLE, workers=args.workers, quick=args.quick, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
