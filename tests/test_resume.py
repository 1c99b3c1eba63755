"""One source of truth: a study's state is its Optuna storage and its trials/<number>/ folders.

- `study resume` runs no code from the study folder: pickles planted where Tune keeps its Tuner and
  searcher state, and a checkpoint that carries code, are never unpickled (a marker file their unpickling
  would create stays absent), and the study still completes.
- A missing, empty or foreign Optuna storage is refused in one line (exit 2), never answered with a new study.
- study/ uses no restore path, no legacy module map and no private attribute of Ray, Optuna or MLflow.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import optuna
import pytest
from conftest import QUICKSTART, ROOT, fake_pretrain, fake_run_trial, logging_trial
from optuna.trial import TrialState

from study import cli
from study.search.optimize.space import load_space
from study.search.study import resume_study, run_study


class Planted:
    """A pickle whose unpickling creates `marker` (it could as well run any command)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _space(**more):
    return load_space(QUICKSTART, {"study.n_trials": 3, "study.max_concurrent": 1, "study.checkpoint_every_s": 0,
                                   **more})


@pytest.mark.usefixtures("local_ray")
def test_resume_unpickles_nothing_from_the_study_folder(tmp_path):
    import torch

    ray = sys.modules["ray"]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runs, marker = tmp_path / "runs", tmp_path / "code-ran"
    interrupted = tmp_path / "interrupted"
    trial = functools.partial(fake_run_trial, interrupt=(1, os.getpid(), str(interrupted)))
    first = run_study(_space(), runs_dir=runs, final_eval=False, pretrain=fake_pretrain, run_trial=trial)
    assert first.status == "interrupted"
    folder = runs / "quickstart"
    experiment = folder / "tune" / "quickstart"
    assert (experiment / "tuner.pkl").is_file()  # Tune's own pickle of the first run: scratch

    evil = pickle.dumps(Planted(str(marker)))
    (experiment / "tuner.pkl").write_bytes(evil)
    (experiment / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(evil)
    for sub in experiment.glob("trial_*"):
        (sub / "params.pkl").write_bytes(evil)
    running = [t.number for t in optuna.load_study(study_name="quickstart", storage=f"sqlite:///{folder / 'optuna.db'}")
               .trials if t.state == TrialState.RUNNING]
    assert running == [1]
    torch.save({"step": 1, "model": Planted(str(marker))}, folder / "trials" / "0001" / "checkpoint.pt")

    log = tmp_path / "starts.txt"
    again = resume_study("quickstart", runs_dir=runs, final_eval=False, pretrain=fake_pretrain,
                         run_trial=functools.partial(logging_trial, log=str(log), inner=trial))
    assert not marker.exists(), "resuming ran code planted in the study folder"
    assert again.status == "complete" and again.complete == 3
    assert "quickstart-0001 0" in log.read_text().splitlines()  # its checkpoint refused: trial 1 started over
    assert not (experiment / "searcher-state-2026-01-01_00-00-00.pkl").exists()  # Tune's old folder replaced
    assert (experiment / "tuner.pkl").read_bytes() != evil


@pytest.mark.usefixtures("local_ray")
def test_a_trial_done_in_optuna_but_running_in_mlflow_is_finished_on_resume(tmp_path):
    """A driver killed after Optuna's tell and before the MLflow callback ended the trial leaves its run RUNNING
    without its model: the resume finishes it (FINISHED, its model logged), it is not marked KILLED."""
    from mlflow.tracking import MlflowClient

    ray = sys.modules["ray"]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runs = tmp_path / "runs"
    trial = functools.partial(fake_run_trial, interrupt=(1, os.getpid(), str(tmp_path / "interrupted")))
    assert run_study(_space(), runs_dir=runs, final_eval=False, pretrain=fake_pretrain,
                     run_trial=trial).status == "interrupted"
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart").experiment_id
    run = client.search_runs([exp], filter_string="tags.optuna_trial_number = '0'")[0]
    assert run.info.status == "FINISHED"
    client.update_run(run.info.run_id, status="RUNNING")  # the kill came before the callback ended the run
    from study.trial import sparse_file
    from study.trial.config import load_trial
    from study.trial.data import dataset_info
    from study.trial.models import create_model

    cfg = load_trial(ROOT / "configs" / "trial_digits.yaml")  # the fake trial wrote no model: a real one
    folder = runs / "quickstart" / "trials" / "0000"
    sparse_file.save(create_model(cfg.model.arch, dataset_info(cfg.data.name)).state_dict(), folder / "model.pt")
    (folder / "result.json").write_text(json.dumps({"config": cfg.to_dict(), "metrics": {"params_kept": 7.0}}))
    again = resume_study("quickstart", runs_dir=runs, final_eval=False, pretrain=fake_pretrain, run_trial=trial)
    assert again.status == "complete" and again.complete == 3
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    logged = client.search_logged_models([exp], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in logged] == ["quickstart-0000"]
    attached = {x.key: x.value for x in logged[0].metrics}  # the run's final report, attached to its model
    final = client.get_run(run.info.run_id).data.metrics
    assert attached["params_kept"] == final["params_kept"] and attached["val_robust_acc"] == final["val_robust_acc"]


def _hand_made_study(runs: Path, name: str = "quickstart", storage: str = "optuna.db") -> Path:
    """A study folder as `study run` leaves it (manifest, space), with no Optuna storage yet."""
    folder = runs / name
    folder.mkdir(parents=True)
    shutil.copy(QUICKSTART, folder / "space.yaml")
    (folder / "study.json").write_text(json.dumps({"name": name, "space_file": str(QUICKSTART), "storage": storage,
                                                   "tracking_uri": "../mlflow.db", "runs_dir": ".."}))
    return folder


def _resume(runs: Path, capsys) -> tuple[int, list[str]]:
    rc = cli.main(["resume", "quickstart", "--runs-dir", str(runs)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if not line.endswith("resuming would start a new study")]


def test_a_missing_empty_or_foreign_optuna_storage_is_refused_in_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    folder = _hand_made_study(runs)
    db = folder / "optuna.db"

    rc, err = _resume(runs, capsys)
    assert rc == 2 and len(err) == 1 and "optuna.db does not exist; resuming would start a new study" in err[0], err
    assert not db.exists()  # nothing created

    db.write_bytes(b"")
    rc, err = _resume(runs, capsys)
    assert rc == 2 and len(err) == 1 and "optuna.db is empty" in err[0], err
    assert db.stat().st_size == 0

    db.unlink()
    optuna.create_study(study_name="another", storage=f"sqlite:///{db}")
    rc, err = _resume(runs, capsys)
    assert rc == 2 and len(err) == 1 and "holds no study of that name (studies there: another)" in err[0], err

    study = optuna.create_study(study_name="quickstart", storage=f"sqlite:///{db}", directions=["minimize", "maximize"])
    study.ask()
    (folder / "trials" / "0003").mkdir(parents=True)  # the folder knows a trial this storage never asked
    rc, err = _resume(runs, capsys)
    assert rc == 2 and len(err) == 1 and "holds 1 trials, but the study folder has trials/0003/" in err[0], err
    assert len(optuna.load_study(study_name="quickstart", storage=f"sqlite:///{db}").trials) == 1


# ---------------------------------------------------------------------------------------------------
# What study/ must not contain.

# the restore path, the legacy module map, Ray's OptunaSearch, and private names of Ray/Optuna/MLflow the
# study's code once used (the AST check below finds others)
FORBIDDEN_TEXT = ("Tuner.restore", "_legacy", "OptunaSearch", ".restore_from_dir(", "can_restore", "._ot_trials",
                  "._ot_study", "._local_tuner", "._tune_config", "._run_config", "._study_id", "._trial_id",
                  "._completed_trials", "._artifact_repos_cache", "._tracking_client", "._tracking_service")
THIRD_PARTY = ("ray", "optuna", "mlflow")
OUT_OF_SCOPE = ("torch", "nn", "F")  # torch's private helpers are the trial's business, not the study's
TORCH_METHODS = ("_conv_forward",)  # nn.Conv2d's, called by the masked conv layer (study.trial.pruning)


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted((ROOT / "study").rglob("*.py"))}


def _own_private_names(trees: dict[Path, ast.AST]) -> tuple[set[str], set[str]]:
    """The _names the package defines: (functions and classes, attributes it assigns on self)."""
    defined: set[str] = set()
    assigned: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                assigned.add(node.attr)
    return defined, assigned


def _root(node: ast.AST) -> str:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def test_study_has_no_restore_path_no_legacy_modules_and_no_private_third_party_attributes():
    sources = _sources()
    for path, text in sources.items():
        for word in FORBIDDEN_TEXT:
            assert word not in text, f"{path.relative_to(ROOT)} contains {word!r}"
    trees = {p: ast.parse(t) for p, t in sources.items()}
    defined, assigned = _own_private_names(trees)
    bad = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] in THIRD_PARTY and (any(p.startswith("_") for p in parts)
                                                or any(a.name.startswith("_") for a in node.names)):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in THIRD_PARTY and any(p.startswith("_") for p in a.name.split(".")):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = _root(node)
                ours = node.attr in defined or (root in ("self", "cls") and node.attr in assigned)
                if not ours and root not in OUT_OF_SCOPE and node.attr not in TORCH_METHODS:  # self._x of a class of ours, store._open(), ...
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "private attributes or modules of other libraries used in study/:\n" + "\n".join(bad)
