"""The code of a logged trial model (an MLflow "model from code": MLflow stores this file and runs it on load;
no pickled object). See study/trial/mlflow_model.py."""
import mlflow.models

from study.trial.mlflow_model import pyfunc_model

mlflow.models.set_model(pyfunc_model())
