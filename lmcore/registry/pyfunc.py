"""The lmops language model as an MLflow pyfunc: prompt strings in, completions out.

Logged "from code" (``lmcore/registry/pyfunc_entry.py``), so MLflow pickles nothing: the class is
imported and its weights are read from safetensors in ``load_context``. Any process that
can ``import lmcore`` (the pip requirement ``lmops``) can load and serve it.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pandas as pd

from lmcore.model.checkpoint import load_model
from lmcore.model.generate import SamplingParams, generate_text
from lmcore.registry.tracking import MODEL_DIR_ARTIFACT
from lmcore.training.lora import is_adapter_only, merge_adapter_folder

try:  # keep importable without mlflow for docs/tools; MLflow itself always has it
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

# After importing mlflow (it installs its own warning filters): our predict is untyped on purpose.
warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")

DEFAULT_PARAMS = {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "seed": -1}


class LmopsLanguageModel(PythonModel):
    """Wraps ``lmcore.model.checkpoint.load_model`` + ``lmcore.model.generate.generate_text``.

    ``predict`` has no type hints on purpose: the signature is explicit (``signature()``), and
    MLflow's hint-based validation would reject the sampling ``params``.
    """

    def load_context(self, context) -> None:  # noqa: ANN001 - no hints: MLflow infers schemas from them

        folder = Path(context.artifacts[MODEL_DIR_ARTIFACT])
        if is_adapter_only(folder):  # registry.adapter_only: the base named in its config, adapter merged in
            self._merged = tempfile.TemporaryDirectory(prefix="lmops-merged-")
            folder = merge_adapter_folder(folder, Path(self._merged.name) / "model")
        self.model, self.tokenizer, self.meta = load_model(folder)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow passes a DataFrame

        p = {**DEFAULT_PARAMS, **(params or {})}
        seed = int(p["seed"])
        sp = SamplingParams(max_new_tokens=int(p["max_new_tokens"]), temperature=float(p["temperature"]),
                            top_p=float(p["top_p"]), seed=None if seed < 0 else seed)
        if isinstance(model_input, pd.DataFrame):
            prompts = model_input["prompt"].astype(str).tolist()
        elif isinstance(model_input, dict):
            prompts = [str(x) for x in (model_input["prompt"] if isinstance(model_input["prompt"], list)
                                        else [model_input["prompt"]])]
        else:
            prompts = [str(x) for x in model_input]
        return pd.DataFrame({"completion": [generate_text(self.model, self.tokenizer, s, sp) for s in prompts]})


def signature():
    """``prompt`` (string) -> ``completion`` (string), with sampling knobs as inference params."""
    from mlflow.models import ModelSignature  # lazy: MLflow imports in ~1.8 s
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "completion")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
            ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
            ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
            ParamSpec("seed", "long", DEFAULT_PARAMS["seed"]),
        ]),
    )
