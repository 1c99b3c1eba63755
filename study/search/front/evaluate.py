"""The test-split evaluation of a study's Pareto front, after the search (`Study.final_evaluation`).

Trials are selected on validation figures only; then every Pareto-front trial is evaluated on the TEST
split as a Ray task on one trial's resources: the confirmation (study.confirm, always) and, with a
study.robustness section, the suite's final budget. The figures are saved beside the trial's files
(study.search.front.front_files), logged to the trial's MLflow run and added to the Pareto table's rows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from study.keys import NUMBER_KEY, TEST_PREFIX, trial_run_key
from study.search import console
from study.search.folder.layout import CONFIRM_FILE, trial_dir
from study.search.front import front_files
from study.search.front.progress import Board
from study.search.front.robust_eval import evaluate_on_test

if TYPE_CHECKING:
    from study.search.study import Study

log = logging.getLogger("study.search")


def evaluate_front(st: "Study", optuna_study: Any, tracker: Any, cpus: float, gpus: float) -> int:
    """The TEST split, once per Pareto-front trial (the models the study chose on validation figures),
    as Ray tasks on one trial's resources:

    - the confirmation (study.confirm, always): clean, strong PGD, standard AutoAttack; saved as
      trials/<n>/confirm.json, logged as `test_*` metrics and the tag `test_attack`;
    - with a study.robustness section, the suite's final budget; saved as trials/<n>/robustness_final.json,
      logged with the `test.` prefix.

    A part saved with the same settings is not redone (resume, report). Progress lines while it runs
    (study.search.front.progress). Returns the trials evaluated."""
    from analysis import pareto

    s = st.space.study
    suite, conf = s.robustness, s.confirm
    todo = []
    for t in pareto.front_trials(optuna_study):
        folder = st.trial_folder(t.number)
        need_confirm = front_files.load_confirm(folder, conf) is None
        need_suite = suite is not None and front_files.load_final(folder, suite.final_budget) is None
        if not (need_confirm or need_suite):
            continue
        if not (folder / "model.pt").is_file():
            log.warning("test-split evaluation: trial %d has no %s; skipped", t.number, folder / "model.pt")
            continue
        todo.append((t, folder, need_confirm, need_suite))
    if not todo:
        return 0
    searched_eps = {"attack.eps", "eval.eps"} & set(st.space.keys)
    eps = None if searched_eps else st.space.base_config().eval_eps
    parts = [conf.attack_text(eps)] + ([f"robustness suite ({suite.final_budget.text()})"]
                                    if suite is not None else [])
    print(f"[study] test-split evaluation of {len(todo)} Pareto-front trial(s): {'; '.join(parts)} ...", flush=True)
    board = Board([t.number for t, *_ in todo], console.print_progress)  # progress lines (front.progress)
    try:
        return _evaluate(st, tracker, todo, board, cpus, gpus)
    finally:
        board.close()


def _evaluate(st: "Study", tracker: Any, todo: list, board: Board, cpus: float, gpus: float) -> int:
    import ray

    s = st.space.study
    suite, conf = s.robustness, s.confirm
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(evaluate_on_test)
    refs = [task.remote(st.trial_config({**t.params, NUMBER_KEY: t.number}),
                        str(folder / "model.pt"), conf if need_confirm else None,
                        suite if need_suite else None, max(1, int(cpus)), board.sink(t.number))
            for t, folder, need_confirm, need_suite in todo]
    done = 0
    for (t, folder, _, _), ref in zip(todo, refs):
        try:
            payload, report = board.get(ref)
        except Exception as e:  # one trial's evaluation failing must not lose the study's report
            log.warning("test-split evaluation of trial %d failed: %s", t.number, e)
            continue
        run_id = _trial_run_id(st, tracker, t)
        text, wall = [], 0.0
        if payload is not None:
            path = front_files.save_confirm(folder, payload)
            _log_confirm(tracker, run_id, t, payload, path)
            m, wall = payload["metrics"], wall + sum(payload["wall_s"].values())
            text.append(f"test clean {m['test_clean_acc']:.4f}, test robust {m['test_robust_acc']:.4f}")
        if report is not None:
            path = front_files.save_final(folder, report, suite.final_budget)
            _log_final(tracker, run_id, t, report, path)
            wall += report.wall_s.get("total", 0.0)
            text.append("suite " + ("** SUSPECT: a sanity check failed **" if report.suspect else "checks ok"))
        print(f"[study] trial {t.number}: test-split evaluation done in {wall:.0f}s: {'; '.join(text)}", flush=True)
        done += 1
    return done


def _trial_run_id(st: "Study", tracker: Any, trial: Any) -> str | None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        run = tracker.find_run(trial_run_key(st.space.study.name, trial.number, st.manifest.parent_run_id))
        run_id = run.info.run_id if run is not None else None
    if not run_id:
        log.warning("test-split evaluation of trial %d: no MLflow run to log it to", trial.number)
    return run_id


def _log_confirm(tracker: Any, run_id: str | None, trial: Any, payload: Mapping[str, Any], path: Path) -> None:
    if not run_id:
        return
    try:
        tracker.log_summary(run_id, payload["metrics"], tags={"test_attack": payload["test_attack"]})
        tracker.log_file(run_id, path)
    except Exception as e:  # the numbers are saved in the trial folder anyway
        log.warning("could not log the test-split confirmation of trial %d to MLflow: %s", trial.number, e)


def _log_final(tracker: Any, run_id: str | None, trial: Any, report: Any, path: Path) -> None:
    if not run_id:
        return
    p = TEST_PREFIX
    failed = [c.name for c in report.checks if not c.passed]
    try:
        tracker.log_summary(run_id, front_files.final_metrics(report),
                            tags={f"{p}suspect": str(report.suspect).lower(),
                                  f"{p}failed_checks": ", ".join(failed) or "none"})
        tracker.log_file(run_id, path)
    except Exception as e:  # the numbers are saved in the trial folder anyway
        log.warning("could not log the test-split suite evaluation of trial %d to MLflow: %s", trial.number, e)


def add_test_columns(st: "Study", rows: list[dict[str, Any]]) -> tuple[dict[int, dict], list[str]]:
    """Adds the saved test-split columns to the front rows, in place: the confirmation's test_* figures
    and test_attack, and the suite's (test.robust..., test.autoattack..., test.suspect). Returns trial
    number -> saved suite payload, and the distinct test_attack texts."""
    s = st.space.study
    suites, attacks = {}, []
    for row in rows:
        folder = trial_dir(st.paths.root, int(row["trial"]))
        payload = front_files.load_confirm(folder)
        if payload is not None:
            columns = front_files.confirm_columns(payload, folder / CONFIRM_FILE)
            row.update(columns)  # mlflow_run_id stays last (columns_of)
            if columns["test_attack"] and columns["test_attack"] not in attacks:
                attacks.append(columns["test_attack"])
        final = front_files.load_final(folder) if s.robustness is not None else None
        if final is not None and isinstance(final.get("metrics"), dict):
            suites[int(row["trial"])] = final
            row.update(front_files.front_columns(final["metrics"], s.metrics))
    return suites, attacks
