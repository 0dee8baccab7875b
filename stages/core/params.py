"""Typed, frozen settings loaded once from ``params.yaml``.

``params.yaml`` is the single source of settings. Every section is a frozen pydantic
model that rejects unknown keys, so a typo is an error instead of a silently ignored
setting. The command line overrides single keys with ``--set section.key=value``; the
value is parsed as YAML (``--set train.epochs=5``, ``--set gate.min_robust_accuracy={0.1: 0.6}``).

All epsilons for adversarial robustness are on the [0, 1] input scale: pixels for images,
the scaled features for tables (``stages.data.preprocessing``). ``train``, ``evaluate`` and
``gate`` carry per-kind defaults: their ``table:`` keys replace the section's own for tables
(``TrainParams.for_kind``); ``--set train.table.mode=dp`` changes one for tables.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.core.canonical import canonical_json
from stages.core.errors import InvalidInput
from stages.core.sections import Section as _Section
from stages.core.service_params import OrchestrationParams, ServingParams  # noqa: F401 - re-exported


IDENTITY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")  # an approver's identity name




DATA_KINDS = ("image", "table")


def _merge_overlay(section: BaseModel, overlay: dict[str, Any]) -> dict[str, Any]:
    """``section`` as a dict with ``overlay``'s keys replacing its own; nested sections
    (``train.adversarial``) merge key by key, any other value (a dict of thresholds too) is replaced."""
    merged = section.model_dump(mode="python", by_alias=True)
    for key, value in overlay.items():
        current = getattr(section, key, None)
        if isinstance(current, BaseModel) and isinstance(value, dict):
            merged[key] = _merge_overlay(current, value)
        else:
            merged[key] = value
    return merged


class _KindSection(_Section):
    """A section with per-kind defaults: ``table:`` holds the settings that replace the ones
    above it when the data is a table (N x F rows); images use the section as written."""

    table: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _overlay_is_valid(self) -> "_KindSection":
        unknown = sorted(set(self.table) - (set(type(self).model_fields) - {"table"}))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} under 'table'")
        if self.table:
            self.for_kind("table")  # the merged section must itself be valid
        return self

    def for_kind(self, kind: str | None):
        """This section as it applies to data of ``kind`` (``image`` or ``table``)."""
        if kind not in (None, *DATA_KINDS):
            raise ValueError(f"unknown kind of data {kind!r}")
        if kind != "table" or not self.table:
            return self
        merged = _merge_overlay(self, self.table)
        merged["table"] = {}
        return type(self).model_validate(merged)


class ProjectParams(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    owner: str = "unassigned"
    purpose: str = ""
    risk_class: Literal["minimal", "limited", "high"] = "limited"
    intended_use: str = ""
    known_limits: list[str] = Field(default_factory=list)


class DataParams(_Section):
    source: str = "sklearn:digits"
    label_column: str = "label"
    image_shape: tuple[int, ...] | None = None
    classes: list[int | str] | None = None
    columns: dict[str, Literal["numeric", "categorical"]] | None = None
    missing: Literal["refuse", "impute"] = "refuse"
    # A category the training rows did not hold, in a row sent to the trained model
    # (load_verified_model, the pyfunc, mlsec serve): refuse (an error naming the row, column
    # and value) or ignore (the column's indicators all zero). Refuse by default: the model was
    # never trained or evaluated on such a row. Train records it in the signed preprocessing.
    unknown_category: Literal["refuse", "ignore"] = "refuse"
    max_categories: int = Field(default=50, ge=2)

    @field_validator("classes", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            raise ValueError("holds true/false: YAML reads yes/no/on/off as booleans; quote the class names, "
                             "e.g. ['no', 'yes']")
        return value

    @model_validator(mode="after")
    def _shapes(self) -> "DataParams":
        if self.image_shape is not None and (len(self.image_shape) not in (2, 3) or min(self.image_shape) < 1):
            raise ValueError(f"data.image_shape must be [H, W] or [C, H, W] of positive sizes, got {list(self.image_shape)}")
        if self.columns is not None and not self.columns:
            raise ValueError("data.columns must name at least one column (or be null to infer them)")
        return self


class IngestParams(_Section):
    hash_workers: int = Field(default=0, ge=0)
    dvc_push: bool = True


class ValidateParams(_Section):
    min_class_share: float = Field(ge=0)
    max_class_share: float = Field(gt=0)
    max_duplicate_fraction: float = Field(ge=0, le=1)
    drift_mean_tolerance: float = Field(gt=0)
    drift_std_tolerance: float = Field(gt=0)
    drift_class_tolerance: float = Field(default=0.05, gt=0)
    min_rows: int = Field(default=10, ge=1)


class ScreenParams(_Section):
    folds: int = Field(ge=2, le=20)
    max_flagged_fraction: float = Field(gt=0, le=1)
    min_annotator_quality: float = Field(ge=0, le=1)
    detectors: list[str]
    backdoor_epochs: int = Field(default=8, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class AdversarialParams(_Section):
    method: Literal["fgsm_rs", "n_fgsm", "pgd", "trades"] = "fgsm_rs"
    epsilon: float = Field(gt=0, le=1)
    alpha: float | None = Field(default=None, gt=0)
    pgd_steps: int = Field(default=7, ge=1)
    trades_beta: float = Field(default=6.0, gt=0)
    warmup_epochs: int = Field(default=0, ge=0)
    guard_rows: int = Field(default=512, ge=0)
    guard_drop: float = Field(default=0.2, gt=0, le=1)
    guard_alpha_factor: float = Field(default=0.75, gt=0, lt=1)
    guard_max_restores: int = Field(default=2, ge=0)
    guard_fallback: Literal["pgd", "n_fgsm", "smaller_step"] = "pgd"
    guard_fallback_steps: int = Field(default=2, ge=1)


class DPParams(_Section):
    target_epsilon: float | None = Field(default=3.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(default=None, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["prv", "rdp", "gdp"] = "prv"
    secure_rng: bool = False
    poisson_sampling: bool = True
    # the fastest that gives the same per-sample gradients (bench/dp_grad_sample.py, CPU, batch 256:
    # cnn_dp 1.49x a plain step with ew, 1.61x hooks, 1.91x functorch; a full-MNIST DP epoch of
    # cnn_dp 1.91-1.92x the standard epoch with ew, 2.09-2.19x with hooks)
    grad_sample_mode: Literal["hooks", "functorch", "ew"] = "ew"
    max_physical_batch_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> "DPParams":
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of dp.target_epsilon and dp.noise_multiplier")
        return self


class TrainParams(_KindSection):
    mode: Literal["standard", "adversarial", "dp"]
    model: str = "auto"
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(default=0, ge=0)
    amp: bool = True
    adversarial: AdversarialParams
    dp: DPParams


class BackdoorScanParams(_Section):
    """The model-level backdoor scan (trigger inversion, ``stages.ml.backdoor_scan``)."""

    enabled: bool = True
    steps: int = Field(default=300, ge=1)  # optimisation steps per class
    samples: int = Field(default=256, ge=8)  # clean held-out rows of other classes per class
    success: float = Field(default=0.9, gt=0, le=1)  # share of rows a trigger must send to the class


class EvaluateParams(_KindSection):
    test_fraction: float = Field(gt=0, lt=1)
    epsilon: float = Field(gt=0, le=1)
    epsilons: list[float]
    pgd_steps: int = Field(ge=1)
    restarts: int = Field(ge=1)
    attacks: list[str] = Field(default_factory=lambda: ["fgsm", "pgd"], min_length=1)
    # the attacks at the epsilons no decision rests on (neither ``epsilon`` nor a gate
    # threshold's), of those in ``attacks`` (none of them there: every attack); None = every
    # attack at every epsilon
    curve_attacks: list[str] | None = Field(default=None, min_length=1)
    apgd_steps: int = Field(default=100, ge=1)
    attack_rows: int | None = Field(default=None, ge=1)
    early_exit: bool = True
    membership_inference: bool = True
    backdoor_scan: BackdoorScanParams = Field(default_factory=BackdoorScanParams)
    seed: int = 0

    @model_validator(mode="after")
    def _epsilon_listed(self) -> "EvaluateParams":
        if any(not (0 < e <= 1) for e in self.epsilons):
            raise ValueError(f"evaluate.epsilons must lie in (0, 1], got {self.epsilons}")
        if self.epsilon not in self.epsilons:
            raise ValueError(f"evaluate.epsilon={self.epsilon} must be one of evaluate.epsilons={self.epsilons}")
        return self


class RegressionTolerance(_Section):
    clean_accuracy: float = Field(ge=0)
    robust_accuracy: float = Field(ge=0)


class GateParams(_KindSection):
    """Promotion policy. Every threshold left at None is simply not checked, but a policy
    with no thresholds at all rejects (fail closed). Governed: a run's values are compared
    with the signed policy (``stages.core.policy``)."""

    min_clean_accuracy: float | None = Field(default=None, ge=0, le=1)
    # every held-out row with its label as given, rows screening quarantined included: screening
    # cannot lift this figure by dropping the rows a model gets wrong
    min_clean_accuracy_all_test: float | None = Field(default=None, ge=0, le=1)
    # fraction of the held-out rows screening may leave out of the evaluation
    max_test_flagged_fraction: float | None = Field(default=None, ge=0, le=1)
    min_robust_accuracy: dict[float, float] = Field(default_factory=dict)
    # when the attacks ran on a sample of the evaluated rows (evaluate.attack_rows), robust
    # accuracy must clear its threshold with this confidence (a one-sided lower bound); null
    # judges the sample's own figure
    min_sample_confidence: float | None = Field(default=0.95, gt=0, lt=1)
    max_dp_epsilon: float | None = Field(default=None, gt=0)
    max_mia_auc: float | None = Field(default=None, ge=0, le=1)
    max_flagged_fraction: float | None = Field(default=None, ge=0, le=1)
    max_backdoor_anomaly: float | None = Field(default=None, gt=0)
    require_validation: bool = True
    require_integrity: bool = True
    no_regression: RegressionTolerance | None = None


class PromotionParams(_Section):
    """Who decides about the models. Governed like ``gate:``: ``approvers`` names the
    identities (``mlsec keys create --identity NAME``) whose signed approvals may make a model
    the champion, ``reviewers`` those whose signed labels of a review queue count (``mlsec
    review label``, and the retraining that learns from them); the signed policy pins each
    one's public key."""

    mode: Literal["auto", "manual"] = "auto"
    four_eyes: bool = False
    approval_timeout_s: int = Field(default=3600, ge=1)
    approvers: list[str] = Field(default_factory=list)
    reviewers: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "PromotionParams":
        for role, names in (("approvers", self.approvers), ("reviewers", self.reviewers)):
            bad = [a for a in names if not IDENTITY_RE.match(a)]
            if bad:
                raise ValueError(f"promotion.{role} holds invalid identity names {bad}")
            if len(set(names)) != len(names):
                raise ValueError(f"promotion.{role} lists a name twice: {names}")
        if self.four_eyes and self.mode == "auto":
            raise ValueError("promotion.four_eyes: true contradicts promotion.mode: auto (nobody would approve); "
                             "set promotion.mode: manual")
        if self.four_eyes and len(self.approvers) < 2:
            raise ValueError(f"promotion.four_eyes needs at least two promotion.approvers, got {self.approvers}")
        return self


class Params(_Section):
    project: ProjectParams
    data: DataParams
    ingest: IngestParams
    validate_: ValidateParams = Field(alias="validate")
    screen: ScreenParams
    train: TrainParams
    evaluate: EvaluateParams
    gate: GateParams
    promotion: PromotionParams
    serving: ServingParams = Field(default_factory=ServingParams)
    orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """SHA-256 of the effective settings in canonical JSON."""
        return hashlib.sha256(canonical_json(self.as_dict())).hexdigest()

    def flat(self) -> dict[str, Any]:
        """Dotted keys to scalar values (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = node

        walk("", self.as_dict())
        return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed YAML value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise InvalidInput(f"--set expects key=value with a dotted key, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``--set`` overrides applied; unknown keys raise."""
    data = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        overlay = False  # under a per-kind `table:` overlay any setting may be added (validated later)
        for depth, part in enumerate(path[:-1]):
            if overlay and isinstance(node, dict) and part not in node:
                node[part] = {}
            if not isinstance(node, dict) or part not in node:
                raise InvalidInput(f"unknown setting {'.'.join(path[: depth + 1])!r} in --set {item!r}")
            overlay = overlay or (part == "table" and depth == 1)
            node = node[part]
        if not isinstance(node, dict) or (path[-1] not in node and not overlay):
            raise InvalidInput(f"unknown setting {'.'.join(path)!r} in --set {item!r}")
        node[path[-1]] = value
    return data



def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "params"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown setting"
    got = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid setting {loc}: {msg}{shown}{more}"


def params_from_dict(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise InvalidInput(_describe(err)) from None


def read_params_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"params file not found: {path} ('mlsec init' there writes the default one)") from None
    except yaml.YAMLError as err:
        raise InvalidInput(f"params file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"params file {path} must hold a mapping, got {type(raw).__name__}")
    return raw


def load_params(path: Path | str = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Load ``params.yaml``, apply ``--set`` overrides and validate everything once."""
    raw = read_params_yaml(Path(path))
    return params_from_dict(apply_overrides(raw, list(overrides)))
