"""MLflow "model from code" entry point: MLflow runs this file to get the pyfunc (no pickle)."""

from mlflow.models import set_model

from lmcore.registry.pyfunc import LmopsLanguageModel

set_model(LmopsLanguageModel())
