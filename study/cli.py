"""`study run | resume | report | ui | trial | pretrain | evaluate`: the one command line.

Every flag of every command is declared here; each command's body is a function of its module taking
plain arguments (study.search.study.run_study, study.robustness.command.evaluate_command, ...). A user
mistake (bad YAML, unknown key, out-of-range value, unknown name, missing data) prints one line naming
the file, the key and the valid choices, and exits with status 2 before anything starts.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from study.errors import ConfigError, UserError
from study.trial.config import TrialConfig, load_trial, parse_overrides

USER_ERROR = 2
DEFAULT_SPACE = "search_spaces/quickstart.yaml"


def _user_errors() -> tuple[type[BaseException], ...]:
    from study.trial.data import DataError

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
    from study.search.front import front_files, robust_eval
    from study.search.front.robust_settings import ConfirmSettings
    from study.trial.evaluation import step_text
    from study.trial.pipeline import run_trial

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
    settings = ConfirmSettings(points=e.points, steps=e.steps, restarts=e.restarts, step_size=e.step_size,
                                           autoattack=args.autoattack, seed=e.seed)
    payload = robust_eval.confirm(cfg, result.model_state, settings)
    path = front_files.save_confirm(out, payload)
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
    from study.trial.pipeline import pretrain

    cfg = _trial_config(args)
    print(pretrain(cfg))
    return 0


def _add_trial_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a trial config or search-space YAML file (its trial: section is used)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set prune.keep_fraction=0.05 (repeatable)")


# --- run, resume, report: study.search.study ------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default=os.environ.get("STUDY_RUNS_DIR") or "runs",
                   help="where studies live: a folder, or an object store (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX) "
                   "for a cluster without a shared file system (default: $STUDY_RUNS_DIR, else runs)")


def _add_final_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-final-eval", dest="final_eval", action="store_false",
                   help="skip the test-split evaluation of the Pareto front (study.confirm, and "
                        "study.robustness.final_budget); `study resume <name>` runs it later")


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    _add_final_eval(p)
    _add_common(p)
    _add_ray(p)


def _add_study_commands(sub: Any) -> None:
    p = sub.add_parser("run", help="run a study: Ray Tune trials searched by Optuna, recorded in MLflow")
    p.add_argument("space", nargs="?", default=DEFAULT_SPACE, help=f"search-space file (default: {DEFAULT_SPACE})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a value of the file, e.g. --set study.n_trials=4 --set trial.finetune.epochs=2")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<runs-dir>/mlflow.db)")
    p.add_argument("--storage", default=None, help="Optuna storage URL or journal file (default: the file's "
                   "study.storage, else sqlite:///<runs-dir>/<study>/optuna.db)")
    p.add_argument("--fresh", action="store_true", help="delete an existing study of the same name first")
    _add_study_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue an interrupted study (no lost, no duplicated trials)")
    p.add_argument("name", help="study name (the folder under --runs-dir)")
    _add_study_flags(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("report", help="print a study's Pareto front and write its pareto.csv")
    p.add_argument("name", help="study name (the folder under --runs-dir)")
    p.add_argument("--within-points", type=float, default=1.0, metavar="X",
                   help="recommend the smallest model within X accuracy points of the dense model's "
                        "validation robust accuracy (default 1.0)")
    _add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="show a study's MLflow runs in MLflow's UI (serves its own store until Ctrl-C)")
    p.add_argument("name", help="study name (the folder under --runs-dir)")
    p.add_argument("--host", default="127.0.0.1", help="the interface MLflow's server listens on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="its port (default: 5000)")
    p.add_argument("--no-browser", dest="browser", action="store_false", help="print the page's URL only")
    _add_common(p)
    p.set_defaults(func=cmd_ui)


def _exit_code(outcome: Any) -> int:
    """0: the study ended with at least one finished trial; 1: every trial failed; 130: interrupted."""
    if outcome.status != "complete":
        return 130
    if outcome.complete == 0 and outcome.failed > 0:
        print(f"study: every trial failed ({outcome.failed} of {outcome.failed}): their reasons are in the table "
              "above, in Optuna (fail_reason) and in MLflow", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from study.search.optimize.space import load_space
    from study.search.study import run_study

    space = load_space(args.space, parse_overrides(args.set or []))
    return _exit_code(run_study(space, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, storage=args.storage,
                                fresh=args.fresh, address=args.address, num_cpus=args.num_cpus,
                                final_eval=args.final_eval))


def cmd_resume(args: argparse.Namespace) -> int:
    from study.search.study import resume_study

    return _exit_code(resume_study(args.name, runs_dir=args.runs_dir, address=args.address, num_cpus=args.num_cpus,
                                   final_eval=args.final_eval))


def cmd_report(args: argparse.Namespace) -> int:
    from study.search.study import report_study

    if not 0 <= args.within_points <= 100:
        raise ConfigError("--within-points", f"{args.within_points:g} is out of range; must be in [0, 100]")
    report_study(args.name, runs_dir=args.runs_dir, within_points=args.within_points)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from study.search.recording.ui import serve

    return serve(args.name, runs_dir=args.runs_dir, host=args.host, port=args.port, browser=args.browser)


# --- evaluate: study.robustness.command -------------------------------------------------------------


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="robustness curves (Linf/L2/L0), AutoAttack and sanity checks of a trial",
                       description="the robustness suite on a finished trial, from its folder, checkpoint or MLflow run")
    p.add_argument("target", help="trial output folder, its model.pt, or an MLflow run id (runs:/<id>)")
    p.add_argument("--threats", default="linf,l2,l0", help="comma-separated, among linf,l2,l0 (default: all)")
    p.add_argument("--eps", action="append", metavar="THREAT=E,E,...",
                   help="eps list of one threat (repeatable), e.g. linf=0,0.05,0.1 or linf=0,8/255; units: linf "
                        "pixel intensity in [0,1], l2 norm over all C*H*W values, l0 pixels. Default: from the "
                        "trial's eps (linf 0, eps/2, eps, 2eps, 4eps; l2 the same multiples of eps*sqrt(CHW)/4; "
                        "l0 0,1,2,5,10,20 pixels)")
    p.add_argument("--autoattack", action="store_true",
                   help="standard AutoAttack beside PGD at the trial's Linf eps and its matched L2 radius")
    p.add_argument("--autoattack-eps", action="append", metavar="THREAT=E,E,...",
                   help="where AutoAttack runs instead (linf/l2, repeatable; implies --autoattack)")
    p.add_argument("--points", type=int, default=512, help="test points evaluated (seeded choice; default 512)")
    p.add_argument("--steps", type=int, default=50, help="iterations of every gradient attack (default 50)")
    p.add_argument("--restarts", type=int, default=2, help="random restarts (default 2)")
    p.add_argument("--square-queries", type=int, default=1000, help="queries of Square / Sparse-RS (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seeds the points, random starts and queries")
    p.add_argument("--reference", metavar="DENSE_TARGET", help="a dense trial (same forms as TARGET): transfer "
                   "attacks crafted on it")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", metavar="OUT", help="write the report (to_dict) and its provenance here")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of run-id targets (default: $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from study.robustness.command import evaluate_command

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet", "target")}
    return evaluate_command(args.target, **options)


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

    _add_study_commands(sub)  # run, resume, report, ui
    _add_evaluate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from study.search.running.quiet import quiet_libraries

    quiet_libraries()  # alembic's, MLflow's store-creation and matplotlib's font-cache lines
    func: Callable[[argparse.Namespace], int] = args.func
    if args.command in ("run", "resume"):  # before anything imports ray (study.search.running.ray_cluster)
        from study.search.running.ray_cluster import keep_local_ray_on_loopback

        keep_local_ray_on_loopback(args.address)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's Python stack to stderr (a hang's where)
        try:
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
        except (AttributeError, OSError, ValueError):  # no real stderr (an embedding host): no dump, no error
            pass
    try:
        return func(args)
    except _user_errors() as e:
        print(f"study: error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("study: interrupted", file=sys.stderr)
        return 130
    finally:
        _stop_ray()


def _stop_ray() -> None:
    """Shut down the Ray this command started or joined now: Ray's own exit hook waits 0.5 s more first."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
