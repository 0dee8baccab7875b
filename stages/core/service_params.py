"""Settings of what runs around the pipeline rather than inside a run: the prediction
service (``serving:``) and how runs are orchestrated (``orchestration:``). None of them
changes what a run computes; ``stages.core.params`` holds them in ``Params``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.core.sections import Section as _Section


class ServingOutputParams(_Section):
    """What a prediction response reveals (less is harder to extract)."""

    top1_only: bool = False                      # only the label and its confidence, no class probabilities
    round_decimals: int | None = Field(default=4, ge=0, le=8)  # None = full float precision


class ServingAccessParams(_Section):
    rate_limit: str = "50/second"                # per API key, in the `limits` notation ("N/second", "N/minute")
    budget: int = Field(default=100_000, ge=1)   # rows a key may send per budget period (a key may carry its own)
    budget_period_s: int = Field(default=86_400, ge=1)


class ServingTelemetryParams(_Section):
    enabled: bool = True
    url: str | None = None                       # None = SQLite in serving/telemetry.db; or postgresql+psycopg://...
    retention_days: float = Field(default=30, gt=0)
    queue_max: int = Field(default=100_000, ge=1)  # rows held in memory while the store is locked or full


class ServingDetectorParams(_Section):
    enabled: bool = True
    target_fpr: float = Field(default=0.04, gt=0, lt=0.5)  # on clean inputs
    calibration_epsilons: list[float] = Field(default_factory=lambda: [0.1, 0.3])  # PGD, [0, 1] input scale
    calibration_rows: int = Field(default=2000, ge=20)      # most held-out and training rows read per calibration
    action: Literal["flag", "reject"] = "flag"   # reject: answer 422 instead of a prediction


class ServingExtractionParams(_Section):
    enabled: bool = True
    min_queries: int = Field(default=60, ge=10)  # distances needed before the normality test runs
    prada_delta: float = Field(default=0.9, gt=0, lt=1)  # flag when Shapiro-Wilk W falls below this
    ood_fraction: float = Field(default=0.5, gt=0, le=1)  # or when this share of a client's recent queries is flagged
    action: Literal["flag", "throttle", "block"] = "throttle"
    throttled_rate: str = "1/second"


class ServingDriftParams(_Section):
    window: int = Field(default=500, ge=20)      # most recent inputs compared with the champion's training data
    every: int = Field(default=100, ge=1)        # test after this many new inputs
    min_interval_s: float = Field(default=5.0, ge=0)  # and at most this often
    p_value: float = Field(default=0.01, gt=0, lt=1)  # per-feature KS, Bonferroni-corrected
    max_mean_z: float = Field(default=6.0, gt=0)  # |window mean - reference mean| in standard errors
    retrain: bool = True                          # drift emits the retraining event


class ServingAlertParams(_Section):
    window: int = Field(default=200, ge=10)      # predictions per rate window
    low_confidence: float = Field(default=0.6, gt=0, lt=1)
    max_low_confidence_rate: float = Field(default=0.25, gt=0, le=1)
    max_detector_rate: float = Field(default=0.15, gt=0, le=1)


class ServingParams(_Section):
    """The prediction service (``mlsec serve``)."""

    model: str | None = None                     # NAME@ALIAS; None = <project.name>@champion
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    reload_poll_s: float = Field(default=5.0, gt=0)  # how often the alias is checked
    max_batch: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    output: ServingOutputParams = Field(default_factory=ServingOutputParams)
    access: ServingAccessParams = Field(default_factory=ServingAccessParams)
    telemetry: ServingTelemetryParams = Field(default_factory=ServingTelemetryParams)
    detectors: ServingDetectorParams = Field(default_factory=ServingDetectorParams)
    extraction: ServingExtractionParams = Field(default_factory=ServingExtractionParams)
    drift: ServingDriftParams = Field(default_factory=ServingDriftParams)
    alerts: ServingAlertParams = Field(default_factory=ServingAlertParams)
class OrchestrationParams(_Section):
    """How runs are orchestrated; none of it changes what a run computes."""

    work_pool: str = Field(default="mlsec", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    task_runner: Literal["auto", "serial", "threads", "processes", "dask"] = "auto"
    workers: int = Field(default=0, ge=0)
    dask_address: str | None = None
    dask_timeout_s: float = Field(default=10.0, gt=0)
    cache: bool = True
    model_lock_timeout_s: float = Field(default=3600.0, gt=0)
    io_retries: int = Field(default=3, ge=0, le=10)
    heartbeat_s: int = Field(default=30, ge=30)
