"""`study evaluate TARGET`: the robustness suite on a finished trial, from its folder, checkpoint or MLflow run.

    study evaluate runs/trials/digits_hydra --threats linf,l2,l0 --autoattack --points 300
    study evaluate runs:/<run id> --tracking-uri sqlite:///runs/mlflow.db --reference runs/trials/dense

TARGET is a trial output folder (result.json + model.pt, as `study trial` and the study's trials write
them; also in an object store: s3://BUCKET/PREFIX/<study>/trials/0003), a model.pt next to a result.json,
or an MLflow run id (`runs:/<id>` or the 32 hex digits). The
model and the data are rebuilt from the trial's own config; the TEST split is evaluated. For a run id the
model comes from the run's artifacts (a model.pt, with a result.json or trial_config.json beside it) or,
where the study keeps it outside MLflow, from the trial folder the run's params name (output_dir and the
tag optuna_trial_number); the flat metrics (prefixed `robustness.`), a `robustness.json` artifact and the
tag `robustness.suspect` are then logged back to that run.
"""
from __future__ import annotations

import json as json_io
import math
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

from study.errors import UserError, did_you_mean
from study.robustness.targets import Target, load_model, mlflow_client, resolve
from study.robustness.threats import THREATS

# pixel budgets (Croce et al. use 10-24 pixels on MNIST/CIFAR), capped at half the image
L0_PIXELS = (0, 1, 2, 5, 10, 20)
METRIC_PREFIX = "robustness."



def zero_share(model) -> float:
    from torch import nn

    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws)))


# ---------------------------------------------------------------------------------------------------
# Threats and eps.


def _round(v: float) -> float:
    return float(f"{v:.3g}")


def trial_eps(cfg) -> float:
    """The trial's Linf eps (its evaluation eps), or 8/255 for a trial trained without one."""
    e = cfg.eval_eps
    return e if e > 0 else 8 / 255


def matched_l2(cfg, info) -> float:
    """The L2 radius that matches the trial's Linf eps as the benchmarks pair them: MNIST 0.3 <-> 2,
    CIFAR-10 8/255 <-> 0.5, i.e. L2 ~ Linf * sqrt(C*H*W) / 4."""
    return _round(trial_eps(cfg) * math.sqrt(info.in_channels * info.image_size ** 2) / 4)


def default_eps(threat: str, cfg, info) -> list[float]:
    """linf: 0, eps/2, eps, 2 eps, 4 eps (capped at 1); l2: the same multiples of matched_l2; l0: pixels."""
    mult = (0, 0.5, 1, 2, 4)
    if threat == "linf":
        return sorted({min(1.0, _round(k * trial_eps(cfg))) for k in mult})
    if threat == "l2":
        return sorted({_round(k * matched_l2(cfg, info)) for k in mult})
    return [float(k) for k in L0_PIXELS if k <= info.image_size ** 2 // 2]


def parse_threats(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in THREATS]
    if not names or bad:
        hint = did_you_mean(bad[0], THREATS) if bad else ""
        raise UserError(f"--threats: unknown threat {bad[0] if bad else text!r}{hint}; valid choices: {', '.join(THREATS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--threats: a threat is named twice in {text!r}")
    return names


def parse_eps_args(items: list[str] | None, threats: list[str], flag: str = "--eps") -> dict[str, list[float]]:
    """`THREAT=e1,e2,...` (fractions like 8/255 allowed), each validated in its threat's unit."""
    from study.robustness.threats import Threat

    out: dict[str, list[float]] = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in THREATS:
            raise UserError(f"{flag} {item!r}: write THREAT=EPS,EPS,... with THREAT one of {', '.join(THREATS)}"
                            + did_you_mean(name, THREATS).replace(" (", "; ").rstrip(")"))
        if name not in threats:
            raise UserError(f"{flag} {item!r}: {name} is not among --threats {','.join(threats)}")
        if name in out:
            raise UserError(f"{flag}: {name} is given twice")
        try:
            eps = [float(Fraction(v.strip())) for v in values.split(",") if v.strip()]
            out[name] = Threat.parse(name).validate_eps(eps)
        except (ValueError, ZeroDivisionError) as e:
            raise UserError(f"{flag} {item!r}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------------
# The command.


def evaluate_command(target: str, *, threats: str = "linf,l2,l0", eps: list[str] | None = None,
                     autoattack: bool = False, autoattack_eps: list[str] | None = None, points: int = 512,
                     steps: int = 50, restarts: int = 2, square_queries: int = 1000, batch_size: int = 256,
                     seed: int = 0, reference: str | None = None, device: str = "auto", threads: int = 0,
                     json: str | None = None, tracking_uri: str | None = None) -> int:
    """`study evaluate TARGET`: the suite on the TEST split of the target's data set; prints the report,
    writes it to `json` and, for an MLflow run, logs it back to the run. Arguments are the command's flags."""
    args = SimpleNamespace(**locals())  # the flags, also recorded in the report's provenance
    t_start = time.perf_counter()
    threats = parse_threats(args.threats)
    eps_given = parse_eps_args(args.eps, threats)
    aa_given = parse_eps_args(args.autoattack_eps, threats, "--autoattack-eps")
    if any(t == "l0" for t in aa_given):
        raise UserError("--autoattack-eps: AutoAttack covers linf and l2, not l0")
    for k in ("points", "steps", "restarts", "square_queries", "batch_size"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{(Path('runs') / 'mlflow.db').resolve()}"

    with tempfile.TemporaryDirectory(prefix="study-evaluate-") as scratch:
        target = resolve(args.target, uri, Path(scratch) / "target")
        reference = resolve(args.reference, uri, Path(scratch) / "reference") if args.reference else None
        return _evaluate(args, target, reference, threats, eps_given, aa_given, t_start)


def _evaluate(args: SimpleNamespace, target: Target, reference: Target | None, threats: list[str], eps_given, aa_given,
              t_start: float) -> int:
    import torch

    from study.trial.data import load_dataset
    from study.robustness import EvalBudget, evaluate_robustness
    from study.robustness.progress import printer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = target.config
    splits = load_dataset(cfg.data, device)
    info = splits.info
    model = load_model(target, info, device)
    ref_model = None
    if reference is not None:
        rd = reference.config.data
        if (rd.name, rd.split_seed) != (cfg.data.name, cfg.data.split_seed):
            raise UserError(f"--reference {reference.text}: trained on {rd.name} (split seed {rd.split_seed}), "
                              f"the target on {cfg.data.name} (split seed {cfg.data.split_seed})")
        ref_model = load_model(reference, info, device)

    spec = {t: eps_given.get(t) or default_eps(t, cfg, info) for t in threats}
    aa = bool(args.autoattack or aa_given)
    aa_eps = aa_given or {t: [trial_eps(cfg) if t == "linf" else matched_l2(cfg, info)]
                          for t in threats if t in ("linf", "l2")}
    if aa and not aa_eps:
        raise UserError("--autoattack: AutoAttack covers linf and l2; add one of them to --threats")
    budget = EvalBudget(points=args.points, steps=args.steps, restarts=args.restarts, seed=args.seed,
                        batch_size=args.batch_size, square_queries=args.square_queries)

    print(f"evaluating {target.text}: {cfg.data.name} test split ({len(splits.x_test)} images), {cfg.model.arch} "
          f"width {cfg.model.width or 'default'}, "
          + ("dense, " if cfg.prune.method == "dense" else f"{cfg.prune.method} keep {cfg.prune.keep_fraction:g}, ")
          + f"zero weights {zero_share(model):.1%}, trial eps {trial_eps(cfg):.4g}, on {device}"
          + (f"; reference {reference.text}" if reference else ""), flush=True)
    report = evaluate_robustness(model, splits.x_test, splits.y_test, threats=spec, budget=budget,
                                 autoattack=aa, reference_model=ref_model, device=device,
                                 autoattack_eps=aa_eps if aa else None, progress=printer("study evaluate"))
    print(report.table())
    wall = time.perf_counter() - t_start
    print(f"\nwall time of the command: {wall:.1f} s (evaluation {report.wall_s['total']:.1f} s)")

    payload = report.to_dict()
    payload["provenance"] = {
        "target": target.text, "run_id": target.run_id, "model": str(target.model_path),
        "reference": reference.text if reference else "", "config": cfg.to_dict(),
        "threats": spec, "autoattack_eps": aa_eps if aa else {}, "device": str(device),
        "torch_threads": torch.get_num_threads(), "command_wall_s": wall,
        "args": vars(args),
    }
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json_io.dumps(payload, indent=1))
        print(f"report written to {out}")
    if target.run_id:
        log_to_run(target, report, payload)
        print(f"logged to MLflow run {target.run_id} ({target.tracking_uri}): "
              f"{METRIC_PREFIX}* metrics, robustness.json, tag robustness.suspect={str(report.suspect).lower()}")
    return 0


def log_to_run(target: Target, report, payload: dict) -> None:
    """Flat metrics (prefixed, so the trial's own clean_acc is not overwritten), tags and robustness.json."""
    from mlflow.entities import Metric, RunTag

    client = mlflow_client(target.tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(METRIC_PREFIX + k, float(v), now, 0) for k, v in report.flat_metrics().items()]
    tags = [RunTag("robustness.suspect", str(report.suspect).lower()),
            RunTag("robustness.threats", ",".join(report.curves)),
            RunTag("robustness.points", str(report.n_points))]
    failed = [c.name for c in report.checks if not c.passed]
    if failed:
        tags.append(RunTag("robustness.failed_checks", ",".join(failed)[:5000]))
    for start in range(0, max(len(metrics), 1), 1000):
        client.log_batch(target.run_id, metrics=metrics[start:start + 1000], tags=tags if start == 0 else [])
    client.log_dict(target.run_id, payload, "robustness.json")
    client.log_text(target.run_id, report.table(), "robustness.txt")


__all__ = ["Target", "evaluate_command", "default_eps", "matched_l2", "parse_eps_args", "parse_threats",
           "resolve"]
