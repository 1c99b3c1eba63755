"""The README's digits table: undefended and PGD-AT dense models, and HYDRA / LWM / random pruning at
90, 95 and 99% sparsity (per-layer and global scope), each chosen model confirmed on the TEST split by
strong PGD and standard AutoAttack on the same seeded points.

    python -m analysis.experiments.digits_table                 # the full table (about an hour on 2 cores)
    python -m analysis.experiments.digits_table --quick         # 2 rows, tiny budgets (a smoke run)

Every row is one `study trial` (configs/trial_digits.yaml plus the row's overrides); the dense model is
trained once and cached. Writes docs/digits_table.csv and docs/digits_table.md (stamped with machine,
command, date, seed and wall time). The test split is read only after each model is final: nothing here
selects on it.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from analysis.experiments import common
from analysis.experiments.common import ROOT

CONFIG = ROOT / "configs" / "trial_digits.yaml"

DENSE_ROWS = [
    ("undefended dense (natural training)", {"prune.method": "dense", "pretrain_attack.loss": "natural"}),
    ("PGD-AT dense", {"prune.method": "dense"}),
]
METHODS = (("hydra", "HYDRA (ssi)"), ("lwm", "LWM"), ("random", "random"))
KEEPS = (0.1, 0.05, 0.01)


def rows(quick: bool) -> list[tuple[str, dict]]:
    out = list(DENSE_ROWS)
    for scope in ("layer", "global"):
        for keep in KEEPS:
            for method, label in METHODS:
                out.append((f"{label}, {100 * (1 - keep):g}% pruned, {scope}",
                            {"prune.method": method, "prune.keep_fraction": keep, "prune.scope": scope}))
    if quick:
        out = [out[1], out[2]]
    return out


QUICK = {"pretrain.epochs": 1, "prune_stage.epochs": 1, "finetune.epochs": 1, "data.train_limit": 256,
         "eval.steps": 2, "eval.restarts": 1, "eval.val_points": 64}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two rows, tiny budgets: checks the machinery only")
    p.add_argument("--points", type=int, default=150, help="test points (seeded) for PGD and AutoAttack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for digits_table.csv / .md")
    p.add_argument("--work", default=str(ROOT / "runs" / "digits_table"), help="trial outputs and dense cache")
    args = p.parse_args(argv)

    import torch

    from study.search.front import robust_eval
    from study.search.front.robust_settings import ConfirmSettings
    from study.trial.config import load_trial
    from study.trial.pipeline import run_trial

    torch.set_num_threads(max(1, torch.get_num_threads()))
    points = 16 if args.quick else args.points
    confirm = ConfirmSettings(points=points, steps=5 if args.quick else 50,
                                          restarts=1 if args.quick else 3, autoattack=True, seed=args.seed)
    work = Path(args.work)
    started, t_all = datetime.now(timezone.utc), time.perf_counter()
    table = []
    for label, overrides in rows(args.quick):
        over = {**overrides, "seed": args.seed, "cache_dir": str(work / "pretrained"),
                "output_dir": str(work / "trials"), **(QUICK if args.quick else {})}
        cfg = load_trial(CONFIG, over)
        t0 = time.perf_counter()
        result = run_trial(cfg)
        payload = robust_eval.confirm(cfg, result.model_state, confirm)
        m, t = result.metrics, payload["metrics"]
        row = {"model": label, "method": cfg.prune.method, "scope": cfg.prune.scope,
               "keep_fraction": cfg.prune.keep_fraction if cfg.prune.method != "dense" else 1.0,
               "params_kept": int(m["params_kept"]), "params_total": int(m["params_total"]),
               "compression": round(m["compression"], 2),
               "val_clean_acc": round(m["val_clean_acc"], 4), "val_robust_acc": round(m["val_robust_acc"], 4),
               **{k: round(v, 4) for k, v in t.items() if k != "test_points"}, "test_points": int(t["test_points"]),
               "wall_s": round(time.perf_counter() - t0, 1)}
        table.append(row)
        print(f"{label}: test clean {t['test_clean_acc']:.3f} PGD {t['test_pgd_acc']:.3f} "
              f"AA {t['test_autoattack_acc']:.3f} ({row['wall_s']:.0f}s)", flush=True)
    wall = time.perf_counter() - t_all
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "digits_table_quick" if args.quick else "digits_table"
    common.write_csv(out / f"{stem}.csv", table)
    command = common.command_line("analysis.experiments.digits_table", argv)
    (out / f"{stem}.md").write_text(markdown(table, payload["test_attack"], args, wall, command, started))
    print(f"wrote {out / (stem + '.md')} and .csv in {wall / 60:.1f} min")
    return 0


def markdown(table: list[dict], attack: str, args: argparse.Namespace, wall: float, command: str,
             started: datetime) -> str:
    body = common.md_table(table, [
        ("model", "model"), ("kept params", lambda r: f"{r['params_kept']:,} / {r['params_total']:,}"),
        ("compression", lambda r: f"{r['compression']:.2f}x"), ("test clean", lambda r: f"{r['test_clean_acc']:.3f}"),
        ("test PGD", lambda r: f"{r['test_pgd_acc']:.3f}"), ("test AutoAttack", lambda r: f"{r['test_autoattack_acc']:.3f}"),
        ("test robust (worst of both)", lambda r: f"{r['test_robust_acc']:.3f}"),
        ("val robust", lambda r: f"{r['val_robust_acc']:.3f}"),
    ])
    banner = common.QUICK_BANNER + "\n\n" if args.quick else ""
    return ("# Robust pruning on digits: dense, HYDRA, LWM and random\n\n" + banner
            + common.stamp(command, [args.seed], wall, started) + "\n\n"
            + f"Config: configs/trial_digits.yaml. Test attack: {attack}. Validation figures (`val robust`) "
            "are the trial's own PGD on the validation split, which is what a study selects on.\n\n" + body)


if __name__ == "__main__":
    sys.exit(main())
