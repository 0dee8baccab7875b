"""The name-keyed detector registry: ``screen.detectors`` in params.yaml names entries here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stages.screening.results import DetectorResult

Detector = Callable[[Any], DetectorResult]  # takes a ``stages.screening.context.ScreenContext``
DETECTORS: dict[str, Detector] = {}


def register_detector(name: str) -> Callable[[Detector], Detector]:
    """Decorator: register ``fn`` under ``name`` (a later registration replaces an earlier one)."""
    def deco(fn: Detector) -> Detector:
        DETECTORS[name] = fn
        return fn

    return deco
