"""Per-client API keys, stored hashed, and the per-key query budget.

A key is ``mlsec_<client>_<32 random bytes, urlsafe base64>``; only its SHA-256 is stored
(``serving/api-keys.json`` under the workspace, outside git). The token carries 256 random
bits, so a fast hash is enough: nobody can search that space, and lookups stay cheap on
every request. Lookups compare digests in constant time. A key names exactly one client;
presenting another client's key acts as that client and nobody else, and a removed key stops
working at the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from stages.core.errors import InvalidInput
from stages.core.workspace import Workspace, read_json, write_json

CLIENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLES = ("client", "admin")


def keys_path(ws: Workspace) -> Path:
    return ws.root / "serving" / "api-keys.json"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Client:
    name: str
    role: str
    budget: int | None          # rows per budget period; None = the service's default
    rate: str | None = None     # requests, in the `limits` notation ("5/second"); None = the service's default

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class KeyStore:
    """The hashed keys of one workspace; re-read when the file changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._by_digest: dict[str, Client] = {}

    def _load(self) -> dict[str, Any]:
        return read_json(self.path) if self.path.exists() else {"format": "mlsec.api_keys/1", "clients": {}}

    def _refresh(self) -> None:
        mtime = self.path.stat().st_mtime_ns if self.path.exists() else None
        if mtime == self._mtime:
            return
        doc = self._load()
        self._by_digest = {rec["sha256"]: Client(name, rec.get("role", "client"), rec.get("budget"), rec.get("rate"))
                           for name, rec in doc.get("clients", {}).items()}
        self._mtime = mtime

    def authenticate(self, token: str | None) -> Client | None:
        """The client a presented key belongs to, or None."""
        if not token or len(token) > 256:
            return None
        digest = _digest(token)
        with self._lock:
            self._refresh()
            for known, client in self._by_digest.items():
                if hmac.compare_digest(known, digest):
                    return client
        return None

    def add(self, name: str, *, role: str = "client", budget: int | None = None, rate: str | None = None) -> str:
        """Create a key for a new client; return the token (shown once, never stored)."""
        if not CLIENT_RE.match(name or ""):
            raise InvalidInput(f"client name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {ROLES}, got {role!r}")
        if budget is not None and budget < 1:
            raise InvalidInput(f"budget must be at least 1 row, got {budget}")
        if rate is not None:
            from limits import parse  # the limiter library checks the notation

            try:
                parse(rate)
            except ValueError:
                raise InvalidInput(f"rate {rate!r} is not a rate such as '5/second' or '100/minute'") from None
        token = f"mlsec_{name}_{secrets.token_urlsafe(32)}"
        with FileLock(str(self.path) + ".lock", timeout=30):
            doc = self._load()
            if name in doc["clients"]:
                raise InvalidInput(f"client {name!r} already has a key; remove it first to issue a new one")
            doc["clients"][name] = {"sha256": _digest(token), "role": role, "budget": budget, "rate": rate,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_json(self.path, doc)
        return token

    def remove(self, name: str) -> None:
        with FileLock(str(self.path) + ".lock", timeout=30):
            doc = self._load()
            if name not in doc["clients"]:
                raise InvalidInput(f"no client named {name!r}")
            del doc["clients"][name]
            write_json(self.path, doc)

    def clients(self) -> list[dict[str, Any]]:
        doc = self._load()
        return [{"name": n, "role": r.get("role", "client"), "budget": r.get("budget"), "rate": r.get("rate"),
                 "created": r.get("created")}
                for n, r in sorted(doc["clients"].items())]


class Budgets:
    """Rows each client has sent in the current budget period (periods aligned to the epoch).

    Seeded at start from the telemetry store, so a restart does not hand out a fresh budget.
    """

    def __init__(self, *, default_budget: int, period_s: int, used: dict[str, int] | None = None):
        self.default_budget = default_budget
        self.period_s = period_s
        self._period = self.period_start()
        self._used: dict[str, int] = dict(used or {})
        self._lock = threading.Lock()

    def period_start(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        return now - (now % self.period_s)

    def try_spend(self, client: Client, rows: int) -> tuple[bool, int]:
        """Charge ``rows`` to the client when the budget allows; (allowed, rows left after)."""
        limit = client.budget or self.default_budget
        with self._lock:
            start = self.period_start()
            if start != self._period:
                self._period, self._used = start, {}
            used = self._used.get(client.name, 0)
            if used + rows > limit:
                return False, max(0, limit - used)
            self._used[client.name] = used + rows
            return True, limit - used - rows

    def used(self, name: str) -> int:
        with self._lock:
            return self._used.get(name, 0)
