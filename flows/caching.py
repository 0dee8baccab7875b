"""Which stages the flow may reuse from an earlier run, and what their keys are made of
(``stages.trust.stagecache`` holds the mechanism and its security argument).

* ``screen``: the detectors' findings, keyed by the data (Merkle root of the verified
  manifest), ``screen`` settings and the held-out split settings. The stage still runs: it
  verifies the data, writes this run's split and quarantine list and takes the
  poisoning decision from the reused findings.
* ``train``: the weights, model config and training report, keyed by the accepted rows and
  labels (the content of this run's verified split), the ``train`` settings and
  ``data.unknown_category`` (recorded in the preprocessing it saves).
* ``evaluate``: the evaluation, per-sample results and curve, keyed by the weights, model
  config and training report digests (this run's signed index), the split, the
  ``evaluate`` settings and the epsilons evaluated at full strength (the gate's thresholds
  name some of them).

Validation, the gate and registration always run. ``orchestration.cache: false`` or
``--paranoid`` turn reuse off.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from stages.core.params import Params
from stages.evaluate import full_strength_epsilons
from stages.trust.context import RunContext

CACHED_STAGES = ("screen", "train", "evaluate")
OUTPUTS = {
    "screen": ["screen_report"],  # read back for its findings; the stage writes the rest itself
    "train": ["weights", "model_config", "preprocessing", "train_report"],
    "evaluate": ["evaluation", "per_sample", "robustness_curve"],
}
OPTIONAL_OUTPUTS = {"train": ["feature_statistics"]}   # written for some kinds of data only (tables)


def stage_outputs(ctx: RunContext, stage: str) -> list[str]:
    """The outputs a cache entry of ``stage`` in this run carries: ``OUTPUTS`` and those of
    ``OPTIONAL_OUTPUTS`` this run's signed index records (a reuse replays them too)."""
    recorded = ctx.recorded(where=f"{stage} cache")
    return OUTPUTS[stage] + [name for name in OPTIONAL_OUTPUTS.get(stage, []) if name in recorded]


def split_digest(ctx: RunContext, *, where: str) -> str:
    """SHA-256 over the arrays (name, dtype, shape, bytes) of this run's verified split: the
    file's own bytes change with the time it was written, its content does not."""
    data = ctx.input_bytes("split", where=where)["split"]  # checked against the signed index as read
    h = hashlib.sha256()
    with np.load(io.BytesIO(data), allow_pickle=False) as split:
        for name in sorted(split.files):
            arr = np.ascontiguousarray(split[name])
            h.update(f"{name}:{arr.dtype.str}:{arr.shape}\0".encode() + arr.tobytes() + b"\0")
    return h.hexdigest()


def key_parts(ctx: RunContext, params: Params, stage: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings, input digests) of ``stage``; the digests come from verified records."""
    where = f"{stage} cache key"
    kind = ctx.manifest(where=where).get("kind")  # settings as they apply to this kind of data
    if stage == "screen":
        ev = params.evaluate.for_kind(kind)
        return ({"screen": params.screen.model_dump(mode="json"), "kind": kind,
                 "split": {"test_fraction": ev.test_fraction, "seed": ev.seed}}, {})
    if stage == "train":
        return ({"train": params.train.for_kind(kind).model_dump(mode="json"), "kind": kind,
                 "unknown_category": params.data.unknown_category},   # written into the preprocessing train saves
                {"split": split_digest(ctx, where=where)})
    if stage == "evaluate":
        verified = ctx.inputs("weights", "model_config", "preprocessing", "train_report", where=where)  # re-hashed against the signed index
        records = ctx.recorded()
        return ({"evaluate": params.evaluate.for_kind(kind).model_dump(mode="json"), "kind": kind,
                 "full_strength_epsilons": full_strength_epsilons(params, kind)},   # set by the gate's thresholds
                {"split": split_digest(ctx, where=where), **{name: records[name]["sha256"] for name in verified}})
    raise ValueError(f"stage {stage!r} is not cacheable")


def replay_ledger(stage: str, result: dict[str, Any], params: Params) -> tuple[str, dict[str, Any]] | None:
    """The ledger entry the stage would have written, from its reused result."""
    if stage == "train":
        return "train.model", {"weights_sha256": result["weights_sha256"], "architecture": result["architecture"],
                               "mode": result.get("mode", params.train.mode), "privacy": result.get("privacy")}
    if stage == "evaluate":
        return "evaluate.metrics", dict(result["metrics"])
    return None
