"""What `study evaluate` evaluates (its TARGET): a trial folder (local, or in an object store), a model.pt
beside its result.json, or an MLflow run; and the model rebuilt from it (weights-only checkpoint reading)."""
from __future__ import annotations

import hashlib
import json as json_io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.errors import UserError
from study.keys import MODEL_REF_FILE, NUMBER_KEY

RUN_ID = re.compile(r"^[0-9a-f]{32}$")

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
    if text.startswith("models:/"):
        return _from_model(text, tracking_uri, scratch)
    if text.startswith("runs:/"):
        run_id = text[len("runs:/"):].strip("/").split("/")[0]
        if not RUN_ID.match(run_id):
            raise UserError(f"{text}: not an MLflow run id (runs:/ followed by 32 hex digits)")
        return _from_run(text, run_id, tracking_uri, scratch)
    if "://" in text:
        return _from_store(text, scratch)
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


def _from_store(text: str, scratch: Path) -> Target:
    """A trial folder (or its model.pt) in an object store (s3://..., gs://...), copied into `scratch`."""
    from study.search.folder.store import Store
    from study.search.running import preflight

    preflight.check_runs_dir(text, write=False)
    uri = text.rstrip("/")
    folder = uri.rsplit("/", 1)[0] if uri.endswith(".pt") else uri
    store = Store(folder)
    missing = [n for n in ("result.json", "model.pt") if not store.is_file(n)]
    if missing:
        raise UserError(f"{text}: not a trial output folder (missing {' and '.join(missing)} in the bucket)")
    local = scratch / ("store-" + hashlib.sha1(uri.encode()).hexdigest()[:10])
    for name in ("result.json", "model.pt"):
        store.download_file(name, local / name)
    return Target(text, _config_from_result(local / "result.json"), local / "model.pt")


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


def mlflow_client(tracking_uri: str):
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

    client = mlflow_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"{text}: no MLflow run {run_id} in {tracking_uri}") from None
    from study.trial.mlflow_model import logged_model_of_run

    try:
        logged = logged_model_of_run(client, run.info.experiment_id, run_id)
    except MlflowException:  # a store without logged models (an older server)
        logged = None
    if logged is not None:  # the trial's MLflow model: its weights file and config
        return _from_logged_model(text, logged, tracking_uri, scratch)
    files = _artifacts(client, run_id)  # older runs: model/model.pt (or a reference to it) as a plain artifact
    by_name: dict[str, list[str]] = {}
    for f in files:
        by_name.setdefault(f.rsplit("/", 1)[-1], []).append(f)
    folder = lambda p: p.rsplit("/", 1)[0] if "/" in p else ""  # noqa: E731
    results = {folder(p): p for p in by_name.get("result.json", [])}
    models = by_name.get("model.pt", []) or by_name.get(MODEL_REF_FILE, [])
    if models:  # the model is an artifact (or a reference to it): prefer one with its result.json beside it
        model = next((m for m in models if folder(m) in results), models[0])
        model_path = Path(client.download_artifacts(run_id, model, str(scratch)))
        if model_path.name == MODEL_REF_FILE:
            model_path = _referenced_model(text, model_path, scratch)
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


def _from_model(text: str, tracking_uri: str, scratch: Path) -> Target:
    """A logged or registered trial model: models:/<name>@<alias>, models:/<name>/<version> or
    models:/<model id>. Only its two artifacts are read (study.trial.mlflow_model: the weights file, with
    torch's weights-only loader, and the trial config as JSON); the model's code is never run."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    ref = text[len("models:/"):].strip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            source = client.get_model_version_by_alias(name, alias).source
        elif "/" in ref:
            name, version = ref.split("/", 1)
            source = client.get_model_version(name, version).source
        else:
            source = f"models:/{ref}"
        model_id = source[len("models:/"):].strip("/") if source.startswith("models:/") else ""
        if not model_id:
            raise UserError(f"{text}: its source {source!r} is not a logged model of this project")
        model = client.get_logged_model(model_id)
    except MlflowException as e:
        first = (str(e).strip().splitlines() or ["not found"])[0]
        raise UserError(f"{text}: no such model in {tracking_uri} ({first})") from None
    return _from_logged_model(text, model, tracking_uri, scratch)


def _from_logged_model(text: str, model: Any, tracking_uri: str, scratch: Path) -> Target:
    """A Target from a logged trial model's two artifacts (downloaded into `scratch`)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from study.trial.mlflow_model import CONFIG_FILE, WEIGHT_FILE

    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location.rstrip('/')}/artifacts",
                                                          dst_path=str(scratch / model.model_id),
                                                          tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:
        raise UserError(f"{text}: its artifacts could not be read ({e})") from None
    weights, config_file = folder / WEIGHT_FILE, folder / CONFIG_FILE  # folder: the model's artifacts/
    if not weights.is_file() or not config_file.is_file():
        raise UserError(f"{text}: not a trial model of this project (no {WEIGHT_FILE} and {CONFIG_FILE} among its "
                        f"artifacts: {sorted(p.name for p in folder.rglob('*') if p.is_file())[:8]})")
    return Target(text, _config_from_json(config_file), weights, model.source_run_id or "", tracking_uri)


def _config_from_json(path: Path) -> Any:
    from study.trial.config import ConfigError, trial_from_dict

    try:
        return trial_from_dict(json_io.loads(path.read_text()))
    except (json_io.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable trial config ({e})") from None
    except ConfigError as e:
        raise e.with_source(path) from None


def _referenced_model(text: str, ref_file: Path, scratch: Path) -> Path:
    """The model a run references instead of storing it (study.search.recording.tracking.model_by_reference: the
    study folder shares the run's bucket), copied into `scratch` and checked against the reference's sha256."""
    from study.search.folder.store import Store
    from study.search.running import preflight

    try:
        ref = json_io.loads(ref_file.read_text())
        uri, sha256 = ref["uri"], ref["sha256"]
        if not (isinstance(uri, str) and "://" in uri and uri.endswith("/model.pt") and isinstance(sha256, str)):
            raise ValueError("no object URI of a model.pt and its sha256")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{text}: the run's {MODEL_REF_FILE} is not a readable model reference ({e})") from None
    folder = uri.rsplit("/", 1)[0]
    preflight.check_runs_dir(folder, write=False)
    local = scratch / ("ref-" + hashlib.sha1(uri.encode()).hexdigest()[:10]) / "model.pt"
    try:
        Store(folder).download_file("model.pt", local)
    except FileNotFoundError:
        raise UserError(f"{text}: the run's model is kept at {uri}, which no longer exists") from None
    if hashlib.sha256(local.read_bytes()).hexdigest() != sha256:
        raise UserError(f"{text}: {uri} is no longer the model the run logged (its sha256 differs from the "
                        f"run's {MODEL_REF_FILE}): the trial folder was written again since")
    return local


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

    from study.trial.sparse_file import FORMAT, SparseFileError, decode

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            return decode(payload, str(path))  # the sparse file: back to the dense state dict
        return payload
    except SparseFileError as e:
        raise UserError(str(e)) from None
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
