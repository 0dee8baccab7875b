"""Nothing the pipeline runs may call home: the telemetry switches of every library it uses."""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    # cleanlab's Datalab imports Hugging Face datasets: no hub calls, no telemetry
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def telemetry_off() -> None:
    """Set the switches (unless the user set them) before the libraries are imported."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
