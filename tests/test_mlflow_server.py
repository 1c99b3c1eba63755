"""A small real study recorded by a real MLflow tracking server (a process started here on 127.0.0.1, one
worker, proxied artifacts): every COMPLETE trial's model is a logged model with its metrics, the report
registers the recommended one under the study's name and the alias `recommended`, that model predicts through
pyfunc the logits of the trial's exported weights, and `study evaluate` reads it back weights-only."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QUICKSTART

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1 (one worker, as `study ui` starts it), its own sqlite store
    and artifact folder."""
    from test_multinode import free_port

    from study.search.recording import ui

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ui.start_server(f"sqlite:///{root / 'mlflow.db'}", "127.0.0.1", port, str(root / "artifacts"))
    try:
        ui.wait_ready(proc, url, timeout=120)
        yield url, root
    finally:
        ui.stop_server(proc)


@pytest.fixture(scope="module")
def finished(server, tmp_path_factory):
    """A 3-trial quickstart on digits with the real pipeline (the front confirmed on a small test budget, LWM
    baselines at its sizes), recorded by the server, then reported again."""
    from study.search.optimize.space import load_space
    from study.search.study import report_study, run_study

    url, _ = server
    runs = tmp_path_factory.mktemp("runs")
    space = load_space(QUICKSTART, {"study.n_trials": 3, "study.max_concurrent": 2, "trial.pretrain.epochs": 2,
                                    "trial.prune_stage.epochs": 1, "trial.finetune.epochs": 1,
                                    "trial.eval.points": 100, "trial.eval.val_points": 100,
                                    "study.confirm": {"points": 32, "steps": 10, "restarts": 1, "autoattack": False},
                                    "study.baselines": True})
    outcome = run_study(space, runs_dir=runs, tracking_uri=url)
    assert outcome.status == "complete"
    report_study("quickstart", runs_dir=runs)
    return url, runs


def test_trials_models_are_logged_and_the_recommended_one_is_registered(finished, tmp_path):
    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient

    from study.robustness.targets import load_model, resolve
    from study.trial.data import dataset_info
    from study.trial.models import load_exported
    from study.trial.sparse_file import load_state

    url, runs = finished
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("quickstart")
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{runs / 'quickstart' / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    trial_runs = {r.data.tags["optuna_trial_number"]: r for r in client.search_runs(
        [exp.experiment_id], filter_string="tags.run_role = 'trial'")}
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    # one logged model per COMPLETE trial, from that trial's run, its final metrics attached
    assert sorted(m.tags["optuna_trial_number"] for m in models) == sorted(str(t.number) for t in complete)
    for m in models:
        number = int(m.tags["optuna_trial_number"])
        assert m.source_run_id == trial_runs[str(number)].info.run_id and m.name == f"quickstart-{number:04d}"
        result = json.loads((runs / "quickstart" / "trials" / f"{number:04d}" / "result.json").read_text())
        attached = {x.key: x.value for x in m.metrics}
        assert attached["params_kept"] == result["metrics"]["params_kept"]
        assert attached.keys() >= {k for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    # the registry: the report's recommendation under the study's name, alias `recommended`
    version = client.get_model_version_by_alias("quickstart", "recommended")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.run_role = 'study'")[0]
    assert version.run_id == parent.data.tags["recommended_run_id"]
    number = int(next(n for n, r in trial_runs.items() if r.info.run_id == version.run_id))
    folder = runs / "quickstart" / "trials" / f"{number:04d}"
    # pyfunc predicts the logits of the trial's exported weights
    from study.trial.config import trial_from_dict

    cfg = trial_from_dict(json.loads((folder / "result.json").read_text())["config"])
    model = load_exported(cfg, load_state(folder / "model.pt"), dataset_info("digits"), "cpu").eval()
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    mlflow.set_tracking_uri(url)
    try:
        got = mlflow.pyfunc.load_model("models:/quickstart@recommended").predict(x)
    finally:
        mlflow.set_tracking_uri("")
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.as_tensor(x)).numpy(), rtol=0, atol=0)
    # `study evaluate` reads the registered model's weights file (weights-only) and its config
    target = resolve("models:/quickstart@recommended", url, tmp_path / "scratch")
    assert target.model_path.read_bytes() == (folder / "model.pt").read_bytes() and target.config == cfg
    run_target = resolve(f"runs:/{version.run_id}", url, tmp_path / "scratch2")
    assert run_target.model_path.read_bytes() == (folder / "model.pt").read_bytes()
    rebuilt = load_model(target, dataset_info("digits"), "cpu")
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k


def test_baselines_are_runs_beside_the_trials(finished):
    from mlflow.tracking import MlflowClient

    url, runs = finished
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("quickstart").experiment_id
    parent = client.search_runs([exp], filter_string="tags.run_role = 'study'")[0].info.run_id
    baselines = client.search_runs([exp], filter_string="tags.run_role = 'baseline'")
    saved = json.loads((runs / "quickstart" / "baselines.json").read_text())
    assert baselines and len(baselines) == len(saved["baselines"] if isinstance(saved, dict) else saved)
    trial_metrics = set().union(*(r.data.metrics for r in client.search_runs([exp], filter_string="tags.run_role = 'trial'")))
    for b in baselines:  # nested under the study, compared on the trials' own metric names
        assert b.data.tags["mlflow.parentRunId"] == parent and b.data.params["prune.method"] == "lwm"
        assert {"params_kept", "val_robust_acc"} <= b.data.metrics.keys() <= trial_metrics | {"test_points"}



CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("STUDY_SCREENSHOTS")  # a folder (docs/img) to keep the screenshots in, to refresh them
# .ci/run installs Chromium and sets this: there the browser test must run, never be skipped
BROWSER_REQUIRED = os.environ.get("STUDY_REQUIRE_BROWSER") == "1"


@pytest.fixture()
def page(tmp_path):
    """A headless Chromium page (Playwright driving Debian's Chromium) at 1,280 x 900 px."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        why = "headless Chromium (apt-get install chromium) and playwright (pip install -e '.[dev]') are needed"
        if BROWSER_REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-quic",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


def _close_assistant(page) -> None:
    """MLflow 3.17's UI opens an assistant side panel: closed for the screenshots (nothing is asserted on it)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _shot(page, tmp_path: Path, name: str) -> None:
    folder = Path(SHOTS) if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name))


def test_mlflow_ui_and_report_as_a_user_sees_them_in_headless_chromium(finished, page, tmp_path):
    """The MLflow runs view lists the trials and the baselines (the study's parent run expanded, as a user
    clicks it open), the experiment's Models tab every trial's model, the registered model its alias, and the
    study report shows every image decoded."""
    from mlflow.tracking import MlflowClient

    url, runs = finished
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("quickstart").experiment_id
    trials = [r.info.run_name for r in client.search_runs([exp], filter_string="tags.run_role = 'trial'")]
    baselines = [r.info.run_name for r in client.search_runs([exp], filter_string="tags.run_role = 'baseline'")]
    models = [m.name for m in client.search_logged_models(experiment_ids=[exp])]
    assert trials and baselines and models

    ml = "workflowType=machine_learning"  # MLflow's "Model training" view of an experiment (not GenAI's)
    page.goto(f"{url}/#/experiments/{exp}/runs?{ml}")
    page.locator(".ag-row a", has_text="quickstart").first.wait_for(timeout=90_000)
    expand = page.locator("button[data-component-id*='runnamecellrenderer']")  # the parent run's "+" (nested runs)
    for i in range(expand.count()):
        expand.nth(i).click()
    for name in trials + baselines:
        page.locator(".ag-row", has_text=name).first.wait_for(timeout=60_000)
    _close_assistant(page)
    _shot(page, tmp_path, "mlflow_runs.png")

    page.goto(f"{url}/#/experiments/{exp}/models?{ml}")
    for name in models:
        page.get_by_text(name, exact=True).first.wait_for(timeout=90_000)
    _shot(page, tmp_path, "mlflow_models.png")

    page.goto(f"{url}/#/models/quickstart?{ml}")
    page.get_by_text("@ recommended").or_(page.get_by_text("recommended", exact=True)).first.wait_for(timeout=90_000)
    _shot(page, tmp_path, "mlflow_registry.png")

    report = runs / "quickstart" / "report" / "index.html"
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) >= 4 and all(done and w > 300 and h > 200 for done, w, h in images), images
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # the page reads at 1,280 px
    _shot(page, tmp_path, "report.png")
