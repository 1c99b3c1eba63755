"""A trial's exported model as an MLflow model that loads without unpickling anything.

MLflow's pytorch flavour saves the whole module object with torch.save (a pickle), and a pyfunc PythonModel
instance is cloudpickled; both would run code from the artifact store on load. This flavour is a pyfunc
"model from code" (study/trial/mlflow_model_code.py, stored as the model's code): its artifacts are the trial's
sparse weights file (model.pt, read with torch's weights-only loader) and its trial config as JSON; loading
builds the architecture from the config. The input is a float32 NCHW batch of [0, 1] pixels (the model
normalizes itself); the output, the logits.

    model = mlflow.pyfunc.load_model("models:/<study>@recommended")
    logits = model.predict(images)           # numpy float32 (n, C, H, W) -> (n, classes)

`study evaluate models:/<name>@<alias>` reads the same two artifacts, never through pyfunc.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

WEIGHTS, CONFIG = "weights", "config"  # the artifact names of a logged trial model
WEIGHT_FILE, CONFIG_FILE = "model.pt", "trial_config.json"  # their file names under the model's artifacts/
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class TrialModel:
    """The pyfunc model (an mlflow.pyfunc.PythonModel: the base class is added on first use, so importing
    this module does not import MLflow)."""

    def load_context(self, context: Any) -> None:
        from study.trial.config import trial_from_dict
        from study.trial.data import dataset_info
        from study.trial.models import load_exported
        from study.trial.sparse_file import load_state

        cfg = trial_from_dict(json.loads(Path(context.artifacts[CONFIG]).read_text()))
        state = load_state(context.artifacts[WEIGHTS])  # torch's weights-only loader
        self.model = load_exported(cfg, state, dataset_info(cfg.data.name), "cpu")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read a schema from them
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


def pyfunc_model() -> Any:
    import mlflow.pyfunc

    cls = type("TrialModel", (TrialModel, mlflow.pyfunc.PythonModel), {})
    return cls()


def signature(cfg: Any) -> tuple[Any, np.ndarray]:
    """The model signature (float32 NCHW in, float32 logits out) and a one-image input example."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from study.trial.data import dataset_info

    info = dataset_info(cfg.data.name)
    shape = (-1, info.in_channels, info.image_size, info.image_size)
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
                         outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, info.num_classes))]))
    return sig, np.zeros((1, *shape[1:]), dtype=np.float32)


def log_trial_model(run_id: str, weights: Path, config: Mapping[str, Any], metrics: Mapping[str, float],
                    tags: Mapping[str, str] | None = None, tracking_uri: str | None = None, step: int = 0,
                    name: str = "trial-model") -> str:
    """Log a trial's model to its MLflow run under `name` (the Models tab's name, e.g. quickstart-0003: not
    `model`, the run's artifact folder of result.json, which MLflow would resolve to the logged model), the
    run's metrics at `step` (the trial's final report) and the rest of `metrics` attached to the model.
    `tracking_uri`: the store (default: MLflow's current one; the process's setting is restored after).
    Leaves the run FINISHED (the caller sets its final status). Returns the logged model's id."""
    import tempfile

    import mlflow

    from study.trial.config import trial_from_dict

    cfg = trial_from_dict(config)
    sig, example = signature(cfg)
    if Path(weights).name != WEIGHT_FILE:
        raise ValueError(f"{weights}: the weights file must be named {WEIGHT_FILE}")
    # _quiet: MLflow's per-model INFO line and download progress bars, in the study driver's log
    with tempfile.TemporaryDirectory() as tmp, using_store(tracking_uri), _quiet():
        cfg_file = Path(tmp) / CONFIG_FILE
        cfg_file.write_text(json.dumps(dict(config), indent=1))
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(name=name, python_model=str(CODE_FILE),
                                           artifacts={WEIGHTS: str(weights), CONFIG: str(cfg_file)},
                                           signature=sig, input_example=example,
                                           pip_requirements=_requirements(), tags=dict(tags or {}),
                                           model_type="robust-pruned", step=int(step))
            # MLflow attached the run's metrics at `step` (the trial's final report) to the model without
            # logging them again; what the run lacks there is logged for the model (no point twice)
            attached = {m.key for m in mlflow.MlflowClient().get_logged_model(info.model_id).metrics or []}
            numeric = {k: float(v) for k, v in metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in attached}
            if numeric:
                mlflow.log_metrics(numeric, step=int(step), model_id=info.model_id)
    return info.model_id


@contextlib.contextmanager
def using_store(tracking_uri: str | None) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `tracking_uri` for the block (None: left as it is), then put
    back: MLflow resolves `models:/` sources and logs models through that setting, whatever client is used."""
    import mlflow

    before = mlflow.get_tracking_uri()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """While a model is logged: MLflow's INFO lines ("Validating input example ...") and its artifact download
    progress bars off (warnings stay); what was there is put back after."""
    import logging
    import os

    loggers = [logging.getLogger(n) for n in ("mlflow.pyfunc", "mlflow.models", "mlflow.models.model")]
    levels = [lg.level for lg in loggers]
    bar = os.environ.get(PROGRESS_BAR_ENV)
    for lg, level in zip(loggers, levels):
        lg.setLevel(max(logging.WARNING, level))
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bar is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = bar


def _requirements() -> list[str]:
    """What loading needs: this project and torch at the versions logging ran with (no environment scan)."""
    from importlib import metadata

    out = []
    for dist in ("robust-prune-study", "torch", "numpy"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


RECOMMENDED_ALIAS = "recommended"


def logged_model_of_run(client: Any, experiment_id: str, run_id: str) -> Any | None:
    """The model a trial run logged (its first, should there be several), or None."""
    found = client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "creation_timestamp", "ascending": True}])
    return found[0] if found else None


def register_recommended(client: Any, experiment_id: str, name: str, recommended_run_id: str,
                         front_run_ids: Any = (), tracking_uri: str | None = None) -> str | None:
    """Tag the front's logged models (`front: true`) and register the recommended trial's model in the Model
    Registry under `name` with the alias `recommended` (a new version only when the alias points elsewhere).
    Returns the registered version, None when the recommended run has no logged model (nothing registered)."""
    from mlflow.exceptions import MlflowException

    models = {run_id: m for run_id in {*front_run_ids, recommended_run_id}
              if (m := logged_model_of_run(client, experiment_id, run_id)) is not None}
    for run_id in front_run_ids:
        if run_id in models:
            client.set_logged_model_tags(models[run_id].model_id, {"front": "true"})
    chosen = models.get(recommended_run_id)
    if chosen is None:
        return None
    source = f"models:/{chosen.model_id}"
    try:
        current = client.get_model_version_by_alias(name, RECOMMENDED_ALIAS)
        if current.source == source:
            return str(current.version)
    except MlflowException:
        pass
    try:
        client.create_registered_model(name, description="Robust pruned models of the study; alias "
                                       f"'{RECOMMENDED_ALIAS}': the report's recommendation")
    except MlflowException:
        pass  # it exists
    with using_store(tracking_uri):  # the registry resolves models:/<id> through MLflow's process-wide store
        version = client.create_model_version(name, source, run_id=recommended_run_id, model_id=chosen.model_id)
    client.set_registered_model_alias(name, RECOMMENDED_ALIAS, version.version)
    return str(version.version)
