"""`study run | resume | report | trial | pretrain | evaluate`.

A user mistake (bad YAML, unknown key, out-of-range value, unknown name, missing data) prints one line
naming the file, the key and the valid choices, and exits with status 2 before anything starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from study.config import ConfigError, TrialConfig, load_trial, parse_overrides

USER_ERROR = 2


class UserError(Exception):
    """Anything the user can fix by changing a command line, a file or a folder."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from study.data import DataError

    return (ConfigError, UserError, DataError)


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _trial_config(args: argparse.Namespace) -> TrialConfig:
    overrides = parse_overrides(args.set or [])
    return load_trial(args.config, overrides)


def cmd_trial(args: argparse.Namespace) -> int:
    """One chosen model: train it, print its validation figures, then (once) its TEST figures."""
    from study import robust_eval
    from study.evaluation import step_text
    from study.pipeline import run_trial

    cfg = _trial_config(args)
    out = Path(args.output or Path(cfg.output_dir) / cfg.name)
    result = run_trial(cfg)
    result.save(out)
    m = result.metrics
    e = cfg.eval
    print(f"\ntrial {cfg.name}: {cfg.data.name} / {cfg.model.arch} / {cfg.prune.method} "
          f"keep {cfg.prune.keep_fraction:g} ({cfg.prune.scope}, {cfg.prune.score_init})")
    _print_table([
        ("val clean accuracy", f"{m['val_clean_acc']:.4f}"),
        (f"val robust accuracy (PGD-{e.steps} x{e.restarts}, step {step_text(e.step_size, e.steps)}, "
         f"Linf eps {cfg.eval_eps:.4g})", f"{m['val_robust_acc']:.4f}"),
        ("validation points", f"{int(m['val_points'])}"),
        ("parameters kept / total", f"{int(m['params_kept'])} / {int(m['params_total'])}"),
        ("sparsity of prunable weights", f"{m['sparsity']:.4f}"),
        ("compression ratio", f"{m['compression']:.2f}x"),
        ("bytes dense / sparse", f"{int(m['dense_bytes'])} / {int(m['sparse_bytes'])}"),
        ("wall time", f"{m['wall_s']:.1f} s"),
        ("result", str(out / "result.json")),
    ])
    if args.no_test:
        return 0
    # The test split, for this one chosen model: the trial's eval budget (its strong PGD), AutoAttack on request.
    settings = robust_eval.ConfirmSettings(points=e.points, steps=e.steps, restarts=e.restarts, step_size=e.step_size,
                                           autoattack=args.autoattack, seed=e.seed)
    payload = robust_eval.confirm(cfg, result.model_state, settings)
    path = robust_eval.save_confirm(out, payload)
    t = payload["metrics"]
    print(f"\nTEST figures of this model (test split; report these, not the val_* ones):\n  attack: {payload['test_attack']}")
    rows = [("test clean accuracy", f"{t['test_clean_acc']:.4f}"), ("test PGD accuracy", f"{t['test_pgd_acc']:.4f}")]
    if "test_autoattack_acc" in t:
        rows.append(("test AutoAttack accuracy", f"{t['test_autoattack_acc']:.4f}"))
    rows += [("test robust accuracy" + (" (per-point worst case)" if "test_autoattack_acc" in t else ""),
              f"{t['test_robust_acc']:.4f}"),
             ("test points", f"{int(t['test_points'])}"), ("saved", str(path))]
    _print_table(rows)
    if not args.autoattack:
        print("  (a PGD figure only: --autoattack adds standard AutoAttack, the figure to compare with papers)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from study.pipeline import pretrain

    cfg = _trial_config(args)
    print(pretrain(cfg))
    return 0


def _add_trial_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a trial config or search-space YAML file (its trial: section is used)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set prune.keep_fraction=0.05 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="study", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trial", help="run one trial: pretrain (cached) -> prune -> finetune -> evaluate")
    _add_trial_args(p)
    p.add_argument("--output", help="folder for result.json and model.pt (default: output_dir/name)")
    p.add_argument("--autoattack", action="store_true",
                   help="add standard AutoAttack to the test figures (test robust = per-point worst case; slow on CPU)")
    p.add_argument("--no-test", action="store_true", help="print the validation figures only (no test-split evaluation)")
    p.set_defaults(func=cmd_trial)

    p = sub.add_parser("pretrain", help="pre-train (or find in the cache) the dense robust model")
    _add_trial_args(p)
    p.set_defaults(func=cmd_pretrain)

    from study import runner
    from study.robustness import cli as robustness_cli

    runner.add_commands(sub)  # run, resume, report
    robustness_cli.add_command(sub)  # evaluate
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as e:
        print(f"study: error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("study: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
