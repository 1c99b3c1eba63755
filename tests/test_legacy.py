"""A study written by the previous release still resumes.

tests/data/legacy_study_2d898db.tar.gz is an interrupted study made by commit 2d898db with the fake trial of
conftest: 1 of 4 trials done, one RUNNING with an epoch checkpoint in Tune's folder. What counts of it is
its Optuna storage and its trial folders: the resume reads neither Tune's pickles (which name modules that no
longer exist) nor its checkpoints, and the RUNNING trial starts over under its own number.
"""
from __future__ import annotations

import functools
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import optuna
import pytest
from conftest import DATA, fake_pretrain, fake_run_trial, logging_trial, mlflow_trial_runs
from optuna.trial import TrialState

ARCHIVE = DATA / "legacy_study_2d898db.tar.gz"
OLD_ROOT = b"/tmp/legacy_out"  # where the study was written: its manifest, MLflow store and Tune pickles hold it


@pytest.fixture
def legacy_root():
    """A folder whose path is as long as OLD_ROOT, so the old absolute paths can be rewritten in place,
    byte for byte, in every file (pickles and SQLite records keep their lengths). Tune pickled the Optuna
    storage URL and the MLflow tracking URI with the searcher and the callback: rewriting study.json alone
    would resume against the old location."""
    root = Path(tempfile.mkdtemp(prefix="lg", dir="/tmp"))
    assert len(bytes(root)) == len(OLD_ROOT), root
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _extract_relocated(root: Path) -> Path:
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    for path in root.rglob("*"):
        if path.is_file() and OLD_ROOT in (data := path.read_bytes()):
            path.write_bytes(data.replace(OLD_ROOT, bytes(root)))
    return root / "runs"


@pytest.mark.usefixtures("local_ray")
def test_a_study_of_the_previous_layout_resumes_to_exactly_n_trials(legacy_root):
    from study.search.study import resume_study

    runs = _extract_relocated(legacy_root)
    manifest = json.loads((runs / "legacy" / "study.json").read_text())
    assert manifest["storage"] == f"sqlite:///{runs}/legacy/optuna.db"
    pickles = b"".join(p.read_bytes() for p in (runs / "legacy" / "tune" / "legacy").glob("*.pkl"))
    assert b"study.runner" in pickles and b"study.space" in pickles  # the old module paths, by reference
    before = optuna.load_study(study_name="legacy", storage=manifest["storage"]).get_trials()
    assert [t.state for t in before].count(TrialState.COMPLETE) == 1

    log = legacy_root / "starts.txt"
    outcome = resume_study("legacy", runs_dir=runs, pretrain=fake_pretrain,
                           run_trial=functools.partial(logging_trial, log=str(log), inner=fake_run_trial))

    assert outcome.status == "complete"
    trials = optuna.load_study(study_name="legacy", storage=manifest["storage"]).get_trials()
    assert len(trials) == 4 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert trials[0].values == before[0].values  # the finished trial was not run again
    running = [t.number for t in before if t.state == TrialState.RUNNING]
    starts = log.read_text().splitlines()
    assert sorted(starts) == sorted(f"legacy-{n:04d} 0" for n in range(1, 4)), starts  # started over, once each
    assert running and all(f"legacy-{n:04d} 0" in starts for n in running)
    _, runs_by_number = mlflow_trial_runs(runs, "legacy")
    assert sorted(runs_by_number) == [0, 1, 2, 3]  # one MLflow run per trial, none duplicated
    assert {r.info.status for r in runs_by_number.values()} == {"FINISHED"}
