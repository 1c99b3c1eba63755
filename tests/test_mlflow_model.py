"""A trial's model as an MLflow model: logged without pickles, loadable by pyfunc with the same logits, its
metrics attached, registered under an alias, and read back by `study evaluate models:/...` weights-only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from study.errors import UserError
from study.robustness.targets import load_model, resolve
from study.trial import sparse_file
from study.trial.config import load_trial
from study.trial.data import dataset_info
from study.trial.mlflow_model import log_trial_model
from study.trial.models import create_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def logged(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = load_trial(ROOT / "configs" / "trial_digits.yaml")
    torch.manual_seed(0)
    model = create_model("small_cnn", dataset_info("digits")).eval()
    with torch.no_grad():  # a pruned-looking model: most weights zero
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.mul_((torch.rand_like(p) < 0.1).float())
    sparse_file.save(model.state_dict(), tmp_path / "model.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("models")
    with mlflow.start_run() as run:
        pass
    model_id = log_trial_model(run.info.run_id, tmp_path / "model.pt", cfg.to_dict(),
                               {"val_robust_acc": 0.5, "params_kept": 1234.0}, {"study": "models"})
    version = mlflow.register_model(f"models:/{model_id}", "models")
    mlflow.MlflowClient().set_registered_model_alias("models", "recommended", version.version)
    yield model, model_id, uri, exp.experiment_id, tmp_path


def test_logged_model_loads_by_pyfunc_with_the_same_logits_and_no_pickle(logged):
    import mlflow

    model, model_id, uri, exp_id, tmp = logged
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    got = mlflow.pyfunc.load_model("models:/models@recommended").predict(x)
    np.testing.assert_array_equal(got, model(torch.as_tensor(x)).detach().numpy())
    found = mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")
    assert [m.model_id for m in found] == [model_id]
    assert {m.key: m.value for m in found[0].metrics} == {"val_robust_acc": 0.5, "params_kept": 1234.0}
    stored = [p for p in (tmp / "mlruns").rglob("*") if p.is_file()]
    assert not [p for p in stored if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert any(p.name == "MLmodel" for p in stored)


def test_study_evaluate_reads_only_the_weights_of_a_registered_model(logged, tmp_path):
    model, _, uri, _, _ = logged
    for text in ("models:/models@recommended", "models:/models/1"):
        target = resolve(text, uri, tmp_path / text.replace("/", "_").replace(":", "").replace("@", "_"))
        assert target.model_path.name == "model.pt" and target.config.model.arch == "small_cnn"
        rebuilt = load_model(target, dataset_info("digits"), "cpu")
        for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(UserError, match="no such model"):
        resolve("models:/nope@recommended", uri, tmp_path / "nope")


def test_a_copied_store_reads_its_own_logged_models(tmp_path):
    """A runs folder copied elsewhere: relocate_store points the logged models (and registered versions) at the
    copy's artifacts, so `study evaluate models:/...` reads the copy's weights, not the original's."""
    import shutil

    import mlflow

    from study.search.recording.study_mlflow import relocate_store

    cfg = load_trial(ROOT / "configs" / "trial_digits.yaml")
    original = tmp_path / "a" / "runs"
    (original / "mlartifacts").mkdir(parents=True)
    model = create_model("small_cnn", dataset_info("digits")).eval()
    sparse_file.save(model.state_dict(), tmp_path / "model.pt")
    uri = f"sqlite:///{original / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("copied", artifact_location=(original / "mlartifacts" / "copied").as_uri())
    run = client.create_run(exp).info.run_id
    model_id = log_trial_model(run, tmp_path / "model.pt", cfg.to_dict(), {"params_kept": 1.0}, tracking_uri=uri)
    from study.trial.mlflow_model import register_recommended

    assert register_recommended(client, exp, "copied", run, [run], tracking_uri=uri) == "1"
    assert client.get_logged_model(model_id).tags["front"] == "true"
    copy = tmp_path / "b" / "runs"
    shutil.copytree(original, copy)
    shutil.rmtree(original)  # the original is gone: only the copy's files can be read
    copy_uri = f"sqlite:///{copy / 'mlflow.db'}"
    assert relocate_store(copy_uri, "copied", copy / "mlartifacts" / "copied")
    moved = mlflow.MlflowClient(copy_uri)
    assert moved.get_logged_model(model_id).artifact_location.startswith((copy / "mlartifacts").as_uri())
    for text in (f"models:/{model_id}", "models:/copied/1", f"runs:/{run}"):
        target = resolve(text, copy_uri, tmp_path / "scratch" / text.replace("/", "_").replace(":", ""))
        assert target.model_path.read_bytes() == (tmp_path / "model.pt").read_bytes()
