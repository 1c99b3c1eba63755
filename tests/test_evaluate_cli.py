"""`study evaluate`: a trial folder, a checkpoint and an MLflow run id in, the report (table, JSON, MLflow) out.

One tiny dense trial on digits is trained once for the module (pretraining only: a few seconds)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_trial

from study.trial import pipeline
from study.cli import main
from study.trial.config import trial_from_dict
from study.trial.data import DatasetInfo
from study.robustness.command import default_eps, matched_l2

TINY = tiny_trial(name="tiny_eval", pretrain={"epochs": 2, "lr": 0.05}, prune={"method": "dense"},
                  prune_stage=None, finetune=None, eval={"steps": 3, "points": 64, "val_points": 64, "val_steps": 2})
FAST = ["--points", "64", "--steps", "4", "--restarts", "1", "--square-queries", "40", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy cores: torch's thread pool spins
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    """A saved trial output folder (result.json + model.pt), as `study trial` writes it."""
    root = tmp_path_factory.mktemp("trial")
    cfg = trial_from_dict({**TINY, "cache_dir": str(root / "cache"), "output_dir": str(root / "trials")})
    return pipeline.run_trial(cfg).save(root / "trials" / "0000")


def finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    return True


def test_default_eps_follow_the_trial_eps_and_the_image_size():
    cfg = trial_from_dict(TINY)
    digits = DatasetInfo("digits", 10, 1, 8, (0.3,), (0.4,), False)
    assert default_eps("linf", cfg, digits) == [0.0, 0.05, 0.1, 0.2, 0.4]
    assert matched_l2(cfg, digits) == pytest.approx(0.2)  # 0.1 * sqrt(64) / 4
    assert default_eps("l2", cfg, digits) == [0.0, 0.1, 0.2, 0.4, 0.8]
    assert default_eps("l0", cfg, digits) == [0, 1, 2, 5, 10, 20]  # pixels, at most half of the 64
    big = trial_from_dict({**TINY, "attack": {"eps": 0.3}})
    assert default_eps("linf", big, digits)[-1] == 1.0  # 4 eps capped at 1


def test_evaluate_a_trial_folder_prints_the_table_and_writes_json(trial, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["-q", "evaluate", str(trial), "--threats", "linf,l2", *FAST, "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "[linf]" in text and "[l2]" in text and "sanity checks" in text and "[l0]" not in text
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-finite {c} in the JSON"))
    assert finite(data)
    assert set(data["curves"]) == {"linf", "l2"}
    assert data["curves"]["linf"]["eps"] == [0.0, 0.05, 0.1, 0.2, 0.4]
    assert data["n_points"] == 64 and 0 <= data["clean_acc"] <= 1
    assert data["provenance"]["config"]["data"]["name"] == "digits"
    assert data["autoattack"] == []


def test_evaluate_a_checkpoint_with_eps_reference_and_autoattack(trial, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["-q", "evaluate", str(trial / "model.pt"), "--threats", "linf,l0", "--eps", "linf=0,1/20",
               "--eps", "l0=0,2", "--autoattack-eps", "linf=1/20", "--reference", str(trial), *FAST,
               "--points", "16", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "AutoAttack (standard) vs PGD" in text and "transfer" in text
    data = json.loads(out.read_text())
    assert data["curves"]["linf"]["eps"] == [0.0, 0.05] and data["curves"]["l0"]["eps"] == [0.0, 2.0]
    assert [(a["threat"], a["eps"]) for a in data["autoattack"]] == [("linf", 0.05)]
    assert {t["threat"] for t in data["transfer"]} == {"linf", "l0"}


def test_evaluate_reads_the_sparse_file_and_the_older_dense_one_alike(trial, tmp_path, capsys):
    """model.pt is stored sparse (study.trial.sparse_file); a folder written before that holds the dense state
    dict itself. Both evaluate to the same figures."""
    import shutil

    from study.trial.sparse_file import FORMAT, load_state

    assert torch.load(trial / "model.pt", weights_only=True)["format"] == FORMAT
    old = tmp_path / "old"
    shutil.copytree(trial, old)
    torch.save(load_state(trial / "model.pt"), old / "model.pt")  # the dense format
    figures = []
    for folder in (trial, old):
        out = tmp_path / f"{folder.name}.json"
        assert main(["-q", "evaluate", str(folder), "--threats", "linf", "--eps", "linf=0,1/20", *FAST,
                     "--points", "16", "--json", str(out)]) == 0
        figures.append(json.loads(out.read_text())["curves"])
    capsys.readouterr()
    assert figures[0] == figures[1]


@pytest.mark.parametrize("extra, says", [
    (["--threats", "linf,l3"], "unknown threat 'l3'"),
    (["--threats", "linf", "--eps", "linf=0,2"], "outside [0, 1]"),
    (["--threats", "linf", "--eps", "l2=0,1"], "not among --threats"),
    (["--threats", "l0", "--eps", "l0=0,1.5"], "integer"),
    (["--threats", "linf", "--eps", "linf=0,x"], "linf=0,x"),
    (["--threats", "linf", "--points", "0"], "--points"),
    (["--threats", "linf", "--eps", "linf=0,0.1", "--eps", "linf=0.2"], "given twice"),
    (["--threats", "l0", "--autoattack"], "AutoAttack covers linf and l2"),
])
def test_user_errors_exit_2_with_one_line(trial, capsys, extra, says):
    assert main(["-q", "evaluate", str(trial), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("study: error:") and says in err


def test_missing_targets_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for target, says in ((tmp_path / "nope", "no such file or folder"), (tmp_path / "empty", "missing result.json"),
                         ("runs:/123", "not an MLflow run id")):
        assert main(["-q", "evaluate", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err
    assert main(["-q", "evaluate", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no tracking store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_evaluate_mlflow_runs_logs_back(trial, tmp_path, capsys):
    """Runs laid out as the study logs them (flat params, trial_config.json, tag optuna_trial_number; the
    model in the trial folder <output_dir>/<number>), one with the model as an artifact, one with none."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("tiny_eval", artifact_location=(tmp_path / "artifacts").as_uri())
    cfg = trial_from_dict(json.loads((trial / "result.json").read_text())["config"])
    params = cfg.flat()

    def study_run(number: int) -> str:
        run = client.create_run(exp, tags={"study": "tiny_eval", "run_role": "trial",
                                           "optuna_trial_number": str(number)}).info.run_id
        for k, v in params.items():
            client.log_param(run, k, v)
        client.log_dict(run, params, "trial_config.json")
        return run

    in_folder, as_artifact, without = study_run(0), study_run(7), study_run(8)
    client.log_artifact(as_artifact, str(trial / "model.pt"), "trial")
    client.log_artifact(as_artifact, str(trial / "result.json"), "trial")

    for run_id, target in ((in_folder, f"runs:/{in_folder}"), (as_artifact, as_artifact)):
        rc = main(["-q", "evaluate", target, "--threats", "linf", "--eps", "linf=0,0.1", *FAST, "--points", "32",
                   "--tracking-uri", uri])
        assert rc == 0, capsys.readouterr().err
        assert f"logged to MLflow run {run_id}" in capsys.readouterr().out
        data = client.get_run(run_id).data
        assert 0 <= data.metrics["robustness.robust.linf.0.1"] <= data.metrics["robustness.clean_acc"]
        assert data.tags["robustness.suspect"] in ("true", "false")
        assert "robustness.json" in [f.path for f in client.list_artifacts(run_id)]
        logged = json.loads((tmp_path / "artifacts" / run_id / "artifacts" / "robustness.json").read_text())
        assert logged["provenance"]["run_id"] == run_id and logged["curves"]["linf"]["eps"] == [0.0, 0.1]

    assert main(["-q", "evaluate", without, "--threats", "linf", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no model artifact" in err
