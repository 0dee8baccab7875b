"""MLflow pyfunc wrapper, logged as code (MLflow "models from code"): nothing is pickled.

``mlflow.pyfunc.load_model`` runs this file; it verifies the weights, ``model.json`` and
``preprocessing.json`` against their signature and the signed gate verdict, then builds the
network from safetensors behind its preprocessing (``load_verified_model``). Input: the rows
as the user has them: a table's raw columns by name (a pandas DataFrame; the signature lists
them), or images as uint8 pixels or float32 on [0, 1], channels-first or channels-last.
Output: logits, one column per class of ``model.json``'s ``classes``.
"""

from __future__ import annotations

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

    def predict(self, context, model_input, params=None):
        rows = model_input
        if not hasattr(rows, "columns"):
            rows = np.asarray(rows)
        if not hasattr(self.model, "prepare"):  # a model registered before preprocessing specs: float32 on [0, 1]
            rows = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        with torch.no_grad():
            return self.model(rows).cpu().numpy()


mlflow.models.set_model(VerifiedTorchModel())
