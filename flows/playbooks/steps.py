"""Every playbook step leaves a ledger entry: start, each step with its result, finish."""

from __future__ import annotations

from typing import Any

from stages.core.workspace import Workspace
from stages.trust.ledger import Ledger


class Steps:
    def __init__(self, ws: Workspace, playbook: str, model: str, **context: Any):
        self.ledger = Ledger(ws.ledger_path)
        self.playbook, self.model = playbook, model
        self.ledger.append("playbook.start", {"playbook": playbook, "model": model, **context})

    def record(self, step: str, result: dict[str, Any]) -> dict[str, Any]:
        self.ledger.append("playbook.step", {"playbook": self.playbook, "model": self.model, "step": step, "result": result})
        return result

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        self.ledger.append("playbook.finish", {"playbook": self.playbook, "model": self.model,
                                               "result": {k: v for k, v in result.items() if k != "retrain"},
                                               "retrain_status": (result.get("retrain") or {}).get("status")})
        return result
