"""Resume checkpoints by time (study.checkpoint_every_s):
a trial checkpoints at the first epoch end `checkpoint_every_s` after its previous checkpoint (0 = every
epoch); Tune still snapshots its experiment at every controller step (a throttled snapshot lost a trial on resume);
Tune's TensorBoard logger is off, its JSON and CSV loggers stay."""
from __future__ import annotations

import sys

import pytest

from conftest import QUICKSTART, fake_pretrain, fake_run_trial
from study.search import runner
from study.search.space import load_space
from study.search.trainable import CheckpointClock


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


def _checkpoints(root):
    return sorted(p.name for p in (root / "quickstart" / "tune").rglob("checkpoint_*") if p.is_dir())


@pytest.mark.parametrize("every_s, expected", [(60, 0), (0, 2)])  # fake trials: 2 epochs in well under a minute
def test_a_trial_checkpoints_by_time(tmp_path, every_s, expected):
    runs = tmp_path / "runs"
    space = load_space(QUICKSTART, {"study.n_trials": 1, "study.max_concurrent": 1,
                                    "study.checkpoint_every_s": every_s})
    outcome = runner.run_study(space, runs_dir=runs, final_eval=False, pretrain=fake_pretrain,
                               run_trial=fake_run_trial)
    assert outcome.complete == 1
    assert len(_checkpoints(runs)) == expected  # Tune keeps two: both epochs' when every epoch checkpoints
    trial_dirs = [p for p in (runs / "quickstart" / "tune").rglob("trial_0000_*") if p.is_dir()]
    assert len(trial_dirs) == 1
    names = {p.name for p in trial_dirs[0].iterdir()}
    assert {"result.json", "progress.csv"} <= names  # what `tune` and ExperimentAnalysis read
    assert not any(n.startswith("events.out.tfevents") for n in names)  # no TensorBoard logger
