"""Names shared by the trial, the search and the analysis: one source for each.

- The keys that tie a trial together across Tune, Optuna and MLflow: the Optuna trial number in a Tune
  config and on every MLflow trial run (`NUMBER_KEY`), the Ray node that ran it (`NODE_KEY`), the tags
  that find a study's parent run and a trial's nested run (`study_run_key`, `trial_run_key`), and the
  reference a run holds to a model it does not store (`MODEL_REF_FILE`, `MODEL_URI_TAG`).
- Metric names of the robustness suite: eps and r are written by `fmt` (at most 4 decimals, no trailing
  zeros), so an objective's name is the name the suite reports; `suite_metric` builds them, and the suite's
  test-split figures carry `TEST_PREFIX`.

No imports beyond the standard library: every layer may use it.
"""
from __future__ import annotations

NUMBER_KEY = "optuna_trial_number"  # Tune trial config key and MLflow run tag: survives a resume
FAIL_KEY = "fail_reason"  # a failed trial's reason: in its last Tune report, final.json, Optuna and MLflow
NODE_KEY = "ray_node_id"  # the Ray node that trained the trial (final report, final.json, Optuna user attr)
STUDY_TAG = "study"
ROLE_TAG = "run_role"  # "study" on the parent run, "trial" on a nested one
PARENT_TAG = "mlflow.parentRunId"
TEST_PREFIX = "test."  # the suite's final (test split) metrics, e.g. test.robust.linf.0.1
# A trial run whose model stays in the study folder's bucket (study.search.recording.tracking.model_by_reference): the
# artifact model/MODEL_REF_FILE ({"uri", "bytes", "sha256"}) and the tag MODEL_URI_TAG name that object.
MODEL_REF_FILE = "model_ref.json"
MODEL_URI_TAG = "model_uri"


def study_run_key(study: str) -> dict[str, str]:
    """The tags that find a study's parent MLflow run."""
    return {STUDY_TAG: study, ROLE_TAG: "study"}


def trial_run_key(study: str, number: int, parent_run_id: str) -> dict[str, str]:
    """The tags that find a trial's nested MLflow run: keyed by Optuna number, so a resumed trial reuses it."""
    return {STUDY_TAG: study, NUMBER_KEY: str(number), PARENT_TAG: parent_run_id}


def fmt(v: float) -> str:
    """Eps and r as the suite writes them in metric names: 0.1, 0.0314, 2 (at most 4 decimals)."""
    return f"{v:.4f}".rstrip("0").rstrip(".") or "0"


def suite_metric(family: str, threat: str, eps: float, r: float | None = None) -> str:
    """`robust.linf.0.1`, `robust_nested.l0.4`, `scenario.linf.0.1.r0.5`, `autoattack.l2.0.5`, ..."""
    return f"{family}.{threat}.{fmt(eps)}" + (f".r{fmt(r)}" if r is not None else "")
