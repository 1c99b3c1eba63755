"""Tune's progress table during a study's search: every trial's searched parameters and its size
(params_kept) beside the objectives.

Ray's default output engine (RAY_AIR_NEW_OUTPUT unset or 1) chooses the table's columns itself: the
parameters of the Tuner's `param_space` (a study has none: Optuna suggests the values,
study.search.optimize.searcher) and the first four numbers of a trial's last result; it has no public way
to choose them and ignores a `progress_reporter`. So the study's driver turns it off
(RAY_AIR_NEW_OUTPUT=0, which Tune reads when the search starts: `use_table_output`) and hands
`tune.RunConfig(progress_reporter=reporter(space), verbose=VERBOSE)` a CLIReporter with the columns:

- parameters: the search space's keys, as Tune's trial configs carry them (flat dotted names);
- metrics: stage and epoch, params_kept, the objectives, validation clean and robust accuracy, and Tune's
  time per trial, as far as a trial's last report has them (an epoch report carries params_kept where it
  is an objective; the final report always does).

The table is printed every REPORT_EVERY_S seconds (Tune's default engine prints its own every 30 s) and
when the search ends; per-result lines are not (VERBOSE = 1: the table only).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # 0: Tune's table output, which takes a progress_reporter
VERBOSE = 1  # with RAY_AIR_NEW_OUTPUT=0: the experiment's status and the table, no line per result
REPORT_EVERY_S = 30
SIZE_METRIC = "params_kept"
LEADING = ("stage", "epoch", SIZE_METRIC)
TRAILING = ("val_clean_acc", "val_robust_acc")
TIME = {"time_total_s": "total time (s)"}


def use_table_output() -> None:
    """Tune's output with a progress_reporter (before the Tuner is fitted)."""
    os.environ[OUTPUT_ENV] = "0"


def metric_columns(objectives: Sequence[str]) -> dict[str, str]:
    """Result key -> column header, in the table's order (each once)."""
    keys = list(dict.fromkeys([*LEADING, *objectives, *TRAILING]))
    return {**{k: k for k in keys}, **TIME}


def parameter_columns(keys: Sequence[str]) -> dict[str, str]:
    """The searched parameters, by their flat dotted names (Tune's trial config keys)."""
    return {k: k for k in keys}


def reporter(space: Any) -> Any:
    """A CLIReporter with the study's columns (`space`: the study's SearchSpace)."""
    from ray import tune

    return tune.CLIReporter(metric_columns=metric_columns(space.study.metrics),
                            parameter_columns=parameter_columns(space.keys),
                            max_report_frequency=REPORT_EVERY_S, print_intermediate_tables=True,
                            max_column_length=24)
