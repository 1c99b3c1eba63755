"""A study whose data folder is relative (the default `data.root: data`), on CIFAR-10-shaped files in
torchvision's layout: Tune runs each trial in a working directory of its own, so the driver resolves the
folder to an absolute path before any trial reads it. And `study run`'s exit status when every trial failed.
"""
from __future__ import annotations

import optuna
import pytest
import yaml

from conftest import QUICKSTART  # noqa: F401 - the tests folder on sys.path for test_data's writer
from test_data import write_cifar

from study.cli import _exit_code
from study.search.study import Outcome

SPACE = {
    "study": {"name": "cifar_paths", "sampler": "random", "n_trials": 2, "max_concurrent": 2, "cpus_per_trial": 1,
              "gpus_per_trial": 0, "seed": 0, "objectives": [{"metric": "params_kept", "mode": "min"},
                                                             {"metric": "val_robust_acc", "mode": "max"}]},
    "trial": {"data": {"name": "cifar10", "batch_size": 25, "augment": False},  # root: the default, `data`
              "model": {"arch": "small_cnn", "width": 4},
              "pretrain_attack": {"loss": "pgd", "eps": 0.03, "steps": 1},
              "attack": {"loss": "pgd", "eps": 0.03, "steps": 1},
              "pretrain": {"epochs": 1, "lr": 0.05}, "prune_stage": {"epochs": 1, "lr": 0.1},
              "finetune": {"epochs": 1, "lr": 0.01},
              "eval": {"steps": 2, "restarts": 1, "points": 5, "val_points": 5, "val_steps": 1}},
    "search": {"prune.keep_fraction": {"float": [0.2, 0.5]}},
}


@pytest.mark.slow
def test_trials_read_a_relative_data_folder_from_tunes_working_directory(tmp_path, monkeypatch):
    import numpy as np

    from study.cli import main

    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path / "data", np.random.default_rng(0))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    code = main(["run", "space.yaml", "--runs-dir", "runs", "--no-final-eval"])
    assert code == 0
    study = optuna.load_study(study_name="cifar_paths", storage=f"sqlite:///{tmp_path / 'runs/cifar_paths/optuna.db'}")
    states = [t.state.name for t in study.trials]
    reasons = [t.user_attrs.get("fail_reason") for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE"], reasons  # before: "data not found" in every trial


@pytest.mark.parametrize("status, complete, failed, code", [
    ("complete", 2, 0, 0), ("complete", 1, 1, 0), ("complete", 0, 2, 1), ("interrupted", 0, 0, 130),
    ("interrupted", 0, 2, 130)])
def test_exit_status_says_when_every_trial_failed(status, complete, failed, code, capsys):
    outcome = Outcome(status=status, complete=complete, failed=failed, rows=[], pareto_csv=None, parent_run_id="")
    assert _exit_code(outcome) == code
    err = capsys.readouterr().err
    assert ("every trial failed" in err) == (code == 1)
