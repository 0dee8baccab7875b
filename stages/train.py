"""Train: fit the model on the accepted rows only, in the mode ``params.yaml`` names.

Outputs ``model/model.safetensors`` (weights, never pickle) and ``model/model.json`` (the
architecture name and shapes needed to rebuild it), plus ``train.json`` (history, privacy).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from stages.core.params import Params
from stages.core.workspace import write_json
from stages.data.prepared import read_prepared
from stages.models.weights import save_model
from stages.runner import stage_main
from stages.trust.context import RunContext

STAGE = "train"


def run(ctx: RunContext, params: Params) -> dict[str, Any]:
    # torch and Opacus: slow to import, kept off the command line's start
    from stages.ml.training import fit

    folder, manifest = ctx.dataset(where=STAGE)
    split_path = ctx.inputs("split", where=STAGE)["split"]
    X, _, _, meta = read_prepared(folder)
    with np.load(split_path, allow_pickle=False) as split:
        accepted_idx, accepted_labels = split["accepted_idx"], split["accepted_labels"]
    result = fit(X[accepted_idx], accepted_labels, params=params.train, num_classes=int(meta["num_classes"]),
                 checkpoint_dir=ctx.run_dir / "checkpoints", progress=sys.stderr.isatty())
    config = {"architecture": result.model_name, "input_shape": list(meta["input_shape"]), "num_classes": int(meta["num_classes"]),
              "dropout": params.train.dropout, "mode": params.train.mode, "input": "float32 on the [0, 1] scale",
              "output": "logits", "data_sha256": manifest["merkle_root"]}
    files = save_model(result.model, ctx.run_dir / "model", config)
    report = {"mode": params.train.mode, "architecture": result.model_name, "device": result.device,
              "n_train": int(len(accepted_idx)), "history": result.history, "privacy": result.privacy}
    report_path = ctx.path("train.json")
    write_json(report_path, report)
    records = ctx.record_outputs(STAGE, {**files, "train_report": report_path})
    ctx.log("train.model", {"weights_sha256": records["weights"]["sha256"], "architecture": result.model_name,
                            "mode": params.train.mode, "privacy": result.privacy})
    last = result.history[-1] if result.history else {}
    return {"weights_sha256": records["weights"]["sha256"], "architecture": result.model_name, "device": result.device,
            "epochs": len(result.history), "train_accuracy": last.get("accuracy"), "privacy": result.privacy}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
