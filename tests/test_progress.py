"""Progress lines of long evaluations (study.robustness.progress, study.search.front.progress): the
confirmation's PGD and AutoAttack per batch of points with an ETA, throttled, carried from Ray tasks to
the driver; and Tune's progress table with the study's columns (study.search.running.progress_table)."""
from __future__ import annotations

import logging
import re
import sys

import pytest

from study.robustness.progress import AutoAttackMeter, Meter, Update, duration, printer, throttled

ATTACKS = ["apgd-ce", "apgd-t", "fab-t", "square"]
LINE = re.compile(r": (\d+)/(\d+) points, (\d+) s(, ETA (\d+) s)?$")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_say_points_seconds_and_eta():
    assert Update("PGD", 256, 360, 41.2, 16.6).text() == "PGD: 256/360 points, 41 s, ETA 17 s"
    assert Update("PGD", 0, 360, 0.0).text() == "PGD: 0/360 points, 0 s"  # nothing to estimate from yet
    assert Update("PGD", 360, 360, 58.0, 0.0, final=True).text() == "PGD: 360/360 points in 58 s"
    assert [duration(s) for s in (0.4, 119, 125, 3725)] == ["0 s", "119 s", "2 min 05 s", "1 h 02 min"]


def test_throttled_passes_one_per_interval_and_every_first_and_final():
    clock, seen = Clock(), []
    sink = throttled(seen.append, 10.0, clock)
    for t, done in ((0, 0), (3, 1), (9, 2), (10, 3), (12, 4), (25, 5)):
        clock.t = 100.0 + t
        sink(Update("x", done, 9, t))
    sink(Update("x", 9, 9, 26, final=True))  # always, however soon
    sink(Update("y", 0, 9, 0, first=True))  # the next phase starts: always
    sink(Update("y", 1, 9, 1))
    assert [(u.what, u.done) for u in seen] == [("x", 0), ("x", 3), ("x", 5), ("x", 9), ("y", 0)]


def test_meter_estimates_from_the_rate_so_far():
    clock, seen = Clock(), []
    meter = Meter(seen.append, "PGD", 400, clock)
    clock.t += 10
    meter.update(100)
    clock.t += 10
    meter.update(400)
    meter.finish()
    assert [(u.done, u.total, u.elapsed_s, u.eta_s, u.final) for u in seen] == [
        (0, 400, 0.0, None, False), (100, 400, 10.0, 30.0, False), (400, 400, 20.0, 0.0, False),
        (400, 400, 20.0, 0.0, True)]


def _autoattack_lines(meter: AutoAttackMeter, clock: Clock, lines: list[tuple[float, str]]) -> None:
    log = logging.getLogger("test-auto-attack")
    for dt, msg in lines:
        clock.t += dt
        meter.handle(log.makeRecord(log.name, logging.DEBUG, __file__, 0, msg, None, None))


def test_autoattack_meter_follows_autoattack_lines_and_weighs_the_attacks_left():
    """AutoAttack's own DEBUG lines (pyautoattack's run_standard_evaluation) drive it: per attack, the points
    it attacked of those still robust; the ETA weighs the attacks left by AA_COST and the time so far."""
    from study.robustness.progress import AA_COST

    clock, seen = Clock(), []
    meter = AutoAttackMeter(Meter(seen.append, "AutoAttack standard Linf eps=0.1", 40, clock), ATTACKS, robust=30)
    _autoattack_lines(meter, clock, [
        (0, "using standard version including apgd-ce, apgd-t, fab-t, square."),
        (0, "initial accuracy: 75.00%"),  # ignored: the meter was told the 30 robust points
        (0, "running apgd-ce"),
        (2, "apgd-ce - 1/2 - 4 out of 16 successfully perturbed"),
        (2, "apgd-ce - 2/2 - 6 out of 14 successfully perturbed"),
        (0, "robust accuracy after APGD-CE: 50.00% (total time 4.0 s)"),
        (0, "running apgd-t"),
        (20, "apgd-t - 1/2 - 0 out of 16 successfully perturbed"),
        (0, "some line of a later pyautoattack"),
    ])
    first, batch1, batch2, start_t, t1 = seen[1:]
    assert first.what == "AutoAttack standard Linf eps=0.1, apgd-ce (1/4)" and (first.done, first.total) == (0, 30)
    assert first.eta_s is None  # nothing measured yet
    assert (batch1.done, batch2.done, batch2.total) == (16, 30, 30)
    # after apgd-ce: 4 s for 30 points at cost 1; 20 points left robust for apgd-t, fab-t and square
    later = AA_COST["apgd-t"] + AA_COST["fab-t"] + AA_COST["square"]
    assert batch2.eta_s == pytest.approx(4 / 30 * 20 * later)
    assert start_t.what.endswith("apgd-t (2/4)") and (start_t.done, start_t.total) == (0, 20)
    # 24 s for 30 points of apgd-ce and 16 of apgd-t
    unit = 24 / (30 * AA_COST["apgd-ce"] + 16 * AA_COST["apgd-t"])
    assert t1.eta_s == pytest.approx(unit * (4 * AA_COST["apgd-t"] + 20 * (AA_COST["fab-t"] + AA_COST["square"])))
    _autoattack_lines(meter, clock, [(1, "apgd-t - 2/2 - 4 out of 4 successfully perturbed"),
                                     (0, "no robust datapoints left, skipping remaining attacks")])
    assert seen[-1].done == seen[-1].total == 20 and meter.robust == 0 and meter.eta() == 0


def test_printer_writes_throttled_lines(capsys):
    show = printer("study evaluate", every_s=0)
    show(Update("AutoAttack standard L2 eps=0.5", 3, 4, 2.0, 1.0))
    assert capsys.readouterr().err == "study evaluate: AutoAttack standard L2 eps=0.5: 3/4 points, 2 s, ETA 1 s\n"


@pytest.fixture(scope="module")
def tiny():
    """A small_cnn (width 8) trained for 150 steps on digits: most test points survive eps 0.03."""
    import torch
    from conftest import fit_briefly

    from study.trial.config import trial_from_dict
    from study.trial.data import load_dataset
    from study.trial.models import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = trial_from_dict({"data": {"name": "digits"}, "model": {"arch": "small_cnn", "width": 8}})
    sp = load_dataset(cfg.data, "cpu")
    torch.manual_seed(0)
    model = create_model("small_cnn", sp.info, width=8)
    fit_briefly(model, sp)
    yield cfg, model.eval().state_dict(), sp
    torch.set_num_threads(threads)


def _confirm(tiny, eps: float, batch: int = 2, **settings):
    from study.search.front.robust_eval import confirm
    from study.search.front.robust_settings import ConfirmSettings
    from study.trial.config import trial_from_dict

    cfg, state, sp = tiny
    seen: list[Update] = []
    cfg = trial_from_dict(cfg.to_dict(), {"eval.eps": eps, "data.eval_batch_size": batch})
    settings = ConfirmSettings(**{"steps": 5, "restarts": 1, "autoattack": True, **settings})
    payload = confirm(cfg, state, settings, splits=sp, progress=seen.append)
    pgd = [u for u in seen if u.what.startswith(f"PGD-5 x1 restarts Linf eps={eps:g}")]
    aa = [u for u in seen if u.what.startswith(f"AutoAttack standard Linf eps={eps:g}")]
    assert len(pgd) + len(aa) == len(seen)
    return payload, pgd, aa, (cfg, state, sp, settings)


def _attacks(aa: list[Update]) -> list[str]:
    return list(dict.fromkeys(u.what.rsplit(", ", 1)[1] for u in aa if ", " in u.what))


def test_the_confirmation_reports_pgd_and_autoattack_per_batch_with_an_eta(tiny, capsys):
    """A real confirmation (6 test points in batches of 2; at eps 0.3 APGD-CE breaks every point, so
    AutoAttack stops after it): the counts reach their totals and the lines carry an ETA."""
    from study.search import console

    _, pgd, aa, _ = _confirm(tiny, 0.3, points=6)
    assert [u.done for u in pgd] == [0, 2, 4, 6, 6] and pgd[-1].final and all(u.total == 6 for u in pgd)
    assert all(u.eta_s is not None for u in pgd[1:-1])
    assert _attacks(aa) == ["apgd-ce (1/4)"]
    ce = [u for u in aa if u.what.endswith("apgd-ce (1/4)")]
    assert [u.done for u in ce] == [0, 2, 4, 6] and all(u.total == 6 for u in ce)
    assert aa[-1].final and aa[-1].text().startswith("AutoAttack standard Linf eps=0.3: 6/6 points in ")
    console.print_progress("confirming trial 12 (2/3)", ce[1])
    line = capsys.readouterr().err
    assert re.fullmatch(r"\[study\] confirming trial 12 \(2/3\): AutoAttack standard Linf eps=0\.3, apgd-ce \(1/4\): "
                        r"2/6 points, \d+ s, ETA \d+ s\n", line), line


@pytest.mark.slow  # standard AutoAttack's four attacks on 4 points, twice: ~20 s on a CPU
def test_every_autoattack_attack_reports_and_progress_changes_no_figure(tiny):
    from study.search.front.robust_eval import confirm

    payload, pgd, aa, (cfg, state, sp, settings) = _confirm(tiny, 0.03, batch=3, points=4)
    assert _attacks(aa) == ["apgd-ce (1/4)", "apgd-t (2/4)", "fab-t (3/4)", "square (4/4)"]  # points survive each
    for attack in _attacks(aa):
        mine = [u for u in aa if u.what.endswith(attack)]
        assert mine[-1].done == mine[-1].total > 0 and [u.done for u in mine] == sorted(u.done for u in mine)
        assert all(u.eta_s is not None for u in mine[1:])
    assert aa[-1].final and aa[-1].done == aa[-1].total == 4
    without = confirm(cfg, state, settings, splits=sp)
    assert payload["metrics"] == without["metrics"] and payload["autoattack_flags"] == without["autoattack_flags"]
    log = logging.getLogger("auto-attack")
    assert log.level == logging.NOTSET and not log.handlers  # put back as it was


def test_the_suite_reports_its_autoattack(tiny):
    from study.robustness import EvalBudget, evaluate_robustness
    from study.trial.models import load_exported

    cfg, state, sp = tiny
    model = load_exported(cfg, state, sp.info, "cpu")
    seen: list[Update] = []
    report = evaluate_robustness(model, sp.x_test, sp.y_test, threats={"linf": [0.0, 0.3]}, autoattack=True,
                                 budget=EvalBudget(points=6, steps=2, restarts=1, batch_size=2, square_queries=10),
                                 progress=seen.append)
    assert report.autoattack[0].robust_acc == 0.0
    assert seen[0].first and seen[0].what == "AutoAttack standard Linf eps=0.3"
    assert seen[-1].final and (seen[-1].done, seen[-1].total) == (6, 6)
    assert [u.done for u in seen if u.what.endswith("apgd-ce (1/4)")][-1] == 6


def _task(sink, number: int):
    """A Ray task's side: a confirmation's PGD over 4 points, through the TrialSink."""
    from study.robustness.progress import Meter

    meter = Meter(sink.part("confirming"), "PGD-2 x1 restarts Linf eps=0.1", 4)
    meter.update(2)
    meter.update(4)
    meter.finish()
    return number


@pytest.mark.usefixtures("local_ray")
def test_the_driver_prints_the_progress_of_its_ray_tasks():
    import ray

    from study.search.front.progress import Board

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shown: list[tuple[str, Update]] = []
    board = Board([12, 15], lambda label, u: shown.append((label, u)), every=0)
    try:
        task = ray.remote(num_cpus=1)(_task)
        refs = [task.remote(board.sink(n), n) for n in (12, 15)]
        assert [board.get(ref) for ref in refs] == [12, 15]
        board.drain()
    finally:
        board.close()
    for number, label in ((12, "confirming trial 12 (1/2)"), (15, "confirming trial 15 (2/2)")):
        mine = [u for lab, u in shown if lab == label]
        assert [u.done for u in mine] == [0, 2, 4, 4] and mine[-1].final, shown
        assert mine[1].eta_s is not None


def test_the_tune_table_shows_params_kept_and_the_searched_parameters(monkeypatch):
    from ray import tune

    from conftest import QUICKSTART
    from study.search.optimize.space import load_space
    from study.search.running import progress_table

    space = load_space(QUICKSTART, {"study.objectives": [{"metric": "params_kept", "mode": "min"},
                                                         {"metric": "robust.linf.0.1", "mode": "max"}],
                                    "study.robustness": {"threats": {"linf": [0.1]}}})
    assert isinstance(progress_table.reporter(space), tune.CLIReporter)
    monkeypatch.setattr(tune, "CLIReporter", dict)  # the columns it is given
    given = progress_table.reporter(space)
    metrics, params = given["metric_columns"], given["parameter_columns"]
    assert list(params) == space.keys and "prune.keep_fraction" in params
    assert given["print_intermediate_tables"] and given["max_report_frequency"] == progress_table.REPORT_EVERY_S
    assert list(metrics)[:5] == ["stage", "epoch", "params_kept", "robust.linf.0.1", "val_clean_acc"]
    assert "time_total_s" in metrics
    monkeypatch.delenv(progress_table.OUTPUT_ENV, raising=False)
    progress_table.use_table_output()
    from ray.tune.experimental.output import AirVerbosity, get_air_verbosity

    assert get_air_verbosity(AirVerbosity.DEFAULT) is None  # Tune's table output: the reporter is used
