"""Recording a study in MLflow: the parent run, one nested run per trial, the Tune callback.

tracking (the records themselves: Tracker, tags), trial_callback (MlflowTrialCallback: the trials' runs) and study_mlflow (a Study's MLflow side:
its tracker, artifact locations of a copied store, the parent run, the runs of trials that never started).
"""
