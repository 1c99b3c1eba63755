"""`study evaluate TARGET`: the robustness suite on a finished trial, from its folder, checkpoint or MLflow run.

    study evaluate runs/trials/digits_hydra --threats linf,l2,l0 --autoattack --points 300
    study evaluate runs:/<run id> --tracking-uri sqlite:///runs/mlflow.db --reference runs/trials/dense

TARGET is a trial output folder (result.json + model.pt, as `study trial` and the study's trials write
them), a model.pt next to a result.json, or an MLflow run id (`runs:/<id>` or the 32 hex digits). The
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
import re
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from study.errors import UserError, did_you_mean
from study.keys import NUMBER_KEY
from study.robustness.threats import THREATS

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# pixel budgets (Croce et al. use 10-24 pixels on MNIST/CIFAR), capped at half the image
L0_PIXELS = (0, 1, 2, 5, 10, 20)
METRIC_PREFIX = "robustness."


# ---------------------------------------------------------------------------------------------------
# Targets: a trial folder, a checkpoint, or an MLflow run.


@dataclass
class Target:
    text: str            # as given on the command line
    config: Any          # TrialConfig
    model_path: Path
    run_id: str = ""     # set when TARGET was an MLflow run
    tracking_uri: str = ""


def resolve(text: str, tracking_uri: str, scratch: Path) -> Target:
    """A Target from a command-line TARGET; downloads a run's artifacts into `scratch`."""
    if text.startswith("runs:/"):
        run_id = text[len("runs:/"):].strip("/").split("/")[0]
        if not RUN_ID.match(run_id):
            raise UserError(f"{text}: not an MLflow run id (runs:/ followed by 32 hex digits)")
        return _from_run(text, run_id, tracking_uri, scratch)
    path = Path(text)
    if path.is_dir():
        return _from_folder(text, path)
    if path.is_file():
        if not (path.parent / "result.json").is_file():
            raise UserError(f"{text}: no result.json beside the checkpoint (its trial config is read from there)")
        return Target(text, _config_from_result(path.parent / "result.json"), path)
    if RUN_ID.match(text):
        return _from_run(text, text, tracking_uri, scratch)
    raise UserError(f"{text}: no such file or folder, and not an MLflow run id (runs:/<id> or 32 hex digits)")


def _from_folder(text: str, folder: Path) -> Target:
    missing = [n for n in ("result.json", "model.pt") if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{text}: not a trial output folder (missing {' and '.join(missing)})")
    return Target(text, _config_from_result(folder / "result.json"), folder / "model.pt")


def _config_from_result(path: Path) -> Any:
    from study.trial.config import ConfigError, trial_from_dict

    try:
        config = json_io.loads(path.read_text())["config"]
        missing = [k for k in ("model", "data") if not isinstance(config.get(k), dict)]
        if missing:  # the defaults would silently rebuild another model on another data set
            raise UserError(f"{path}: the trial config has no {' and '.join(repr(k) for k in missing)} "
                            f"section{'s' if len(missing) > 1 else ''}; it cannot say which model and data "
                            f"the checkpoint belongs to")
        return trial_from_dict(config)
    except (json_io.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a trial result (no readable 'config': {e})") from None
    except ConfigError as e:
        raise e.with_source(path) from None


def _client(tracking_uri: str):
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():  # MlflowClient would quietly create an empty store
            raise UserError(f"--tracking-uri {tracking_uri}: no tracking store at {db}")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _artifacts(client, run_id: str, path: str | None = None, depth: int = 3) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        if f.is_dir and depth > 0:
            out += _artifacts(client, run_id, f.path, depth - 1)
        elif not f.is_dir:
            out.append(f.path)
    return out


def _from_run(text: str, run_id: str, tracking_uri: str, scratch: Path) -> Target:
    from mlflow.exceptions import MlflowException

    from study.trial.config import trial_from_dict, unflatten

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"{text}: no MLflow run {run_id} in {tracking_uri}") from None
    files = _artifacts(client, run_id)
    by_name: dict[str, list[str]] = {}
    for f in files:
        by_name.setdefault(f.rsplit("/", 1)[-1], []).append(f)
    models = by_name.get("model.pt", [])
    if models:  # the model is an artifact: prefer one with its result.json beside it
        folder = lambda p: p.rsplit("/", 1)[0] if "/" in p else ""  # noqa: E731
        results = {folder(p): p for p in by_name.get("result.json", [])}
        model = next((m for m in models if folder(m) in results), models[0])
        model_path = Path(client.download_artifacts(run_id, model, str(scratch)))
        if folder(model) in results:
            config = _config_from_result(Path(client.download_artifacts(run_id, results[folder(model)], str(scratch))))
        elif by_name.get("trial_config.json"):
            flat = json_io.loads(Path(client.download_artifacts(run_id, by_name["trial_config.json"][0],
                                                             str(scratch))).read_text())
            config = trial_from_dict(unflatten(flat))
        else:
            config = trial_from_dict(unflatten(run.data.params))
        return Target(text, config, model_path, run_id, tracking_uri)
    folder_path = _trial_folder(run)
    if folder_path is not None and (folder_path / "model.pt").is_file() and (folder_path / "result.json").is_file():
        target = _from_folder(text, folder_path)
        return Target(text, target.config, target.model_path, run_id, tracking_uri)
    where = f" nor in its trial folder {folder_path}" if folder_path is not None else ""
    raise UserError(f"{text}: MLflow run {run_id} has no model artifact (no model.pt among its "
                      f"{len(files)} artifacts{where}); evaluate its trial folder or checkpoint instead")


def _trial_folder(run) -> Path | None:
    """Where the study keeps a trial's result.json and model.pt: <output_dir>/<optuna number, 4 digits>."""
    tags, params = run.data.tags, run.data.params
    if tags.get("trial_dir"):
        return Path(tags["trial_dir"])
    number = tags.get(NUMBER_KEY, "")
    if params.get("output_dir") and number.lstrip("-").isdigit():
        return Path(params["output_dir"]) / f"{int(number):04d}"
    return None


def load_model(target: Target, info, device):
    """The trial's architecture with the exported (hard-zero) weights, in eval mode."""
    import torch

    from study.trial.models import load_exported

    cfg = target.config
    state = read_checkpoint(target.model_path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        return load_exported(cfg, state, info, device)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{target.model_path}: does not load into {cfg.model.arch} (width {cfg.model.width}) "
                          f"for {cfg.data.name}: {first[1].strip() if len(first) > 1 else first[0]}") from None


def read_checkpoint(path: Path) -> Any:
    """A model.pt's tensors, loaded with torch's weights-only unpickler (a checkpoint that carries code is
    refused, never run); a damaged or foreign file is a UserError naming it."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text or "Unsupported class" in text:
            detail = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise UserError(f"{path}: refused: the checkpoint holds more than tensors (it could run code when "
                            f"loaded){': ' + detail if detail else ''}") from None
        detail = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln), "unpickling failed")
        raise UserError(f"{path}: not a readable model checkpoint (damaged: {detail})") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes fail inside torch's loaders in arbitrary ways
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable model checkpoint (damaged or truncated: {first})") from None


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
                                 autoattack_eps=aa_eps if aa else None)
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

    client = _client(target.tracking_uri)
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
