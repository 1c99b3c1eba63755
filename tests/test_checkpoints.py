"""Resume checkpoints by time (study.checkpoint_every_s): a trial writes trials/<number>/checkpoint.pt at the
first epoch end `checkpoint_every_s` after its previous checkpoint (0 = every epoch), atomically, and removes it
when it ends (final.json then says it is done). Tune keeps no checkpoint of its own; its TensorBoard logger
is off, its JSON and CSV loggers stay."""
from __future__ import annotations

import sys

import pytest

from conftest import QUICKSTART, fake_pretrain, fake_run_trial
from study.search.optimize.space import load_space
from study.search.running.trainable import CheckpointClock
from study.search.study import run_study


@pytest.fixture(autouse=True, scope="module")
def _ray(local_ray):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_the_clock_is_due_every_interval_and_always_at_zero():
    t = [100.0]
    clock = CheckpointClock(10, now=lambda: t[0])
    due = []
    for step in range(1, 8):  # an epoch every 4 s
        t[0] += 4
        due.append(clock())
    # 104 no (4 s), 108 no (8), 112 yes (12 since the start), 116 no (4), 120 no (8), 124 yes (12), 128 no
    assert due == [False, False, True, False, False, True, False]
    always = CheckpointClock(0, now=lambda: t[0])
    assert [always() for _ in range(3)] == [True, True, True]


def test_the_default_interval():
    assert load_space(QUICKSTART).study.checkpoint_every_s == 60


def checkpoint_watching_trial(cfg, *, on_epoch=None, resume_state=None, log):
    """fake_run_trial, appending after each epoch's report whether the trial's checkpoint file exists."""
    from pathlib import Path

    folder = Path(cfg.output_dir) / cfg.name.rsplit("-", 1)[1]

    def watched(report):
        on_epoch(report)
        with open(log, "a") as f:
            f.write(f"{report.step} {(folder / 'checkpoint.pt').is_file()}\n")

    return fake_run_trial(cfg, on_epoch=watched, resume_state=resume_state)


@pytest.mark.parametrize("every_s, expected", [(60, ["1 False", "2 False"]), (0, ["1 True", "2 True"])])
def test_a_trial_checkpoints_by_time(tmp_path, every_s, expected):
    import functools

    runs, log = tmp_path / "runs", tmp_path / "epochs.txt"
    space = load_space(QUICKSTART, {"study.n_trials": 1, "study.max_concurrent": 1,
                                    "study.checkpoint_every_s": every_s})
    outcome = run_study(space, runs_dir=runs, final_eval=False, pretrain=fake_pretrain,
                        run_trial=functools.partial(checkpoint_watching_trial, log=str(log)))
    assert outcome.complete == 1
    assert log.read_text().split("\n")[:-1] == expected  # fake trials: 2 epochs in well under a minute
    folder = runs / "quickstart" / "trials" / "0000"
    assert (folder / "final.json").is_file() and not (folder / "checkpoint.pt").exists()  # removed at the end
    assert not list((runs / "quickstart" / "tune").rglob("checkpoint_*"))  # Tune keeps none of its own
    trial_dirs = [p for p in (runs / "quickstart" / "tune").rglob("trial_0000_*") if p.is_dir()]
    assert len(trial_dirs) == 1
    names = {p.name for p in trial_dirs[0].iterdir()}
    assert {"result.json", "progress.csv"} <= names  # what `tune` and ExperimentAnalysis read
    assert not any(n.startswith("events.out.tfevents") for n in names)  # no TensorBoard logger


def test_the_checkpoint_is_replaced_atomically_and_loaded_weights_only(tmp_path):
    """TrialFiles: a checkpoint is written beside its final name and renamed over it; one that carries code
    (a pickled global) or is damaged is never unpickled: the trial starts over."""
    import pickle

    import torch

    from study.search.running.trainable import TrialFiles

    files = TrialFiles(str(tmp_path), 7)
    assert files.checkpoint() is None
    files.save_checkpoint({"step": 3, "model": {"w": torch.ones(2)}})
    assert [p.name for p in files.local.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    state = files.checkpoint()
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    marker = tmp_path / "ran"

    class Code:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for blob in (pickle.dumps({"step": 1, "x": Code()}), b"", b"\x80\x04garbage"):
        (files.local / "checkpoint.pt").write_bytes(blob)
        assert files.checkpoint() is None
    assert not marker.exists()
