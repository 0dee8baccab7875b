"""MLflow pyfunc wrapper, logged as code (MLflow "models from code"): nothing is pickled.

``mlflow.pyfunc.load_model`` runs this file; it verifies the weights against their
signature and the signed gate verdict before building the network from safetensors.
Input: float32 array on the [0, 1] scale shaped like the training inputs (or flat rows);
output: logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from stages.models.verify import load_verified_model


class VerifiedTorchModel(PythonModel):
    def load_context(self, context):  # noqa: D401 - MLflow hook

        weights_dir = Path(context.artifacts["weights"])
        self.model = load_verified_model(str(weights_dir.parent.parent))

        self.input_shape = tuple(json.loads((weights_dir / "model.json").read_text())["input_shape"])

    def predict(self, context, model_input, params=None):

        X = np.asarray(model_input, dtype=np.float32).reshape((-1, *self.input_shape))
        with torch.no_grad():
            return self.model(torch.from_numpy(X)).numpy()


mlflow.models.set_model(VerifiedTorchModel())
