"""Red-team drill: a campaign against a running prediction service, over HTTP.

``mlsec drill evasion --url URL --key KEY``: clean digits, uniform noise and PGD at each
epsilon (crafted white-box on the workspace's verified champion, as the guide's simulated
exercise on our own models), sent as an ordinary client. Reports per group the block rate
(refused), evasion rate (answered with a wrong label), and, with an administrator key, the
detection rate (rows the service flagged, matched by input digest in its telemetry).

``mlsec drill extraction --url URL --key KEY``: a Jacobian-augmentation extraction sweep
(Papernot et al., 2017): label a small public seed set through the API, fit a surrogate,
step every known input along the sign of the surrogate's gradient, query the new inputs,
refit, repeat. Reports the queries before the service flagged the client (administrator
key), the block rate, and the surrogate's agreement with the champion on inputs it never
queried.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput, PipelineError
from stages.monitoring.inputs import row_digest

SEED = 0


class Target:
    """The service as a client sees it (one key), plus an optional administrator key."""

    def __init__(self, url: str, key: str, admin_key: str | None, *, timeout: float = 30.0):
        import httpx  # only the drill talks HTTP as a client

        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout)
        self.key, self.admin_key = key, admin_key
        try:
            health = self.http.get(f"{self.url}/healthz").json()
        except (httpx.HTTPError, ValueError) as err:
            raise PipelineError(f"no prediction service answers at {self.url}: {err}") from None
        self.version = health.get("version")

    def _call(self, method: str, path: str, **kwargs: Any):
        import httpx  # only the drill talks HTTP as a client

        for attempt in range(3):   # an idle keep-alive connection the server closed: reconnect
            try:
                return self.http.request(method, f"{self.url}{path}", **kwargs)
            except httpx.TransportError as err:
                if attempt == 2:
                    raise PipelineError(f"the service at {self.url} stopped answering: {err}") from None
                time.sleep(0.2)

    def predict(self, X: np.ndarray, *, key: str | None = None, patient: bool = False) -> tuple[int, dict[str, Any]]:
        """POST one batch; ``patient``: after a 429 that asks for at most 5 s, wait and try once more."""
        for attempt in range(2):
            r = self._call("POST", "/v1/predict", json={"inputs": X.reshape(len(X), -1).tolist()},
                           headers={"Authorization": f"Bearer {key or self.key}"})
            wait = r.headers.get("retry-after", "")
            if not (patient and attempt == 0 and r.status_code == 429 and wait.isdigit() and int(wait) <= 5):
                break
            time.sleep(int(wait))
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {}

    def admin(self, path: str, **params: Any) -> dict[str, Any] | None:
        if not self.admin_key:
            return None
        r = self._call("GET", path, params=params, headers={"Authorization": f"Bearer {self.admin_key}"})
        return r.json() if r.status_code == 200 else None


def _send(target: Target, X: np.ndarray, *, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(status per row, label per row; -1 where refused)."""
    status = np.zeros(len(X), dtype=np.int64)
    labels = np.full(len(X), -1, dtype=np.int64)
    for start in range(0, len(X), batch):
        code, body = target.predict(X[start:start + batch], patient=True)
        status[start:start + batch] = code
        if code == 200:
            labels[start:start + batch] = [p["label"] for p in body["predictions"]]
    return status, labels


def _flagged(target: Target, client: str | None, since: float, X: np.ndarray) -> np.ndarray | None:
    rows = target.admin("/v1/admin/predictions", client=client, since=since, limit=10_000) if client else None
    if rows is None:
        return None
    flagged = {r["input_sha256"] for r in rows["predictions"] if r["flagged"]}
    return np.array([row_digest(x) in flagged for x in X])


def drill_evasion(target: Target, *, model, X: np.ndarray, y: np.ndarray, epsilons: list[float], client: str | None,
                  batch: int = 32) -> dict[str, Any]:
    import torch  # only the PGD campaign needs it

    from stages.ml.attacks import attack_pgd

    gen = torch.Generator().manual_seed(SEED)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y).long()
    groups = {"clean": X, "noise": torch.rand(Xt.shape, generator=gen).numpy()}
    for e in epsilons:
        groups[f"pgd_{e:g}"] = attack_pgd(model, Xt, yt, epsilon=e, alpha=2.5 * e / 20, steps=20, restarts=1,
                                          generator=gen).numpy()
    report: dict[str, Any] = {"kind": "evasion", "url": target.url, "version": target.version, "rows_per_group": len(X), "groups": {}}
    for name, G in groups.items():
        since = time.time() - 1
        status, labels = _send(target, G.astype(np.float32), batch=batch)
        answered = status == 200
        g: dict[str, Any] = {"answered": round(float(answered.mean()), 4), "block_rate": round(float((~answered).mean()), 4),
                             "refusals": {str(c): int((status == c).sum()) for c in sorted(set(status.tolist()) - {200})}}
        flags = _flagged(target, client, since, G)
        if flags is not None and answered.any():   # refused rows never reached the detector
            g["detection_rate"] = round(float(flags[answered].mean()), 4)
        if name != "noise":
            wrong = answered & (labels != y)
            g["evasion_rate"] = round(float((wrong & (~flags if flags is not None else True)).mean()), 4)
            g["wrong_label_rate"] = round(float(wrong.mean()), 4)
        report["groups"][name] = g
    return report


def drill_extraction(target: Target, *, seeds: np.ndarray, test: np.ndarray, champion_labels: np.ndarray | None,
                     client: str | None, max_queries: int, step: float = 0.1, batch: int = 20) -> dict[str, Any]:
    import torch  # only the surrogate needs it
    from torch import nn

    torch.manual_seed(SEED)
    shape = seeds.shape[1:]
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 128), nn.ReLU(), nn.Linear(128, 10))
    known_X: list[np.ndarray] = []
    known_y: list[int] = []
    sent = refused = 0
    flagged_at = None

    def query(X: np.ndarray) -> None:
        nonlocal sent, refused, flagged_at
        for start in range(0, len(X), batch):
            if sent >= max_queries:
                return
            part = X[start:start + min(batch, max_queries - sent)]
            code, body = target.predict(part)
            sent += len(part)
            if code == 200:
                known_X.extend(part)
                known_y.extend(p["label"] for p in body["predictions"])
            else:
                refused += len(part)
            if flagged_at is None and client:
                state = target.admin("/v1/admin/clients")
                s = (state or {}).get("clients", {}).get(client)
                if s and s.get("flagged"):
                    flagged_at = s.get("flagged_at")

    def fit() -> None:
        opt = torch.optim.Adam(surrogate.parameters(), lr=3e-3)
        Xk, yk = torch.from_numpy(np.stack(known_X)), torch.tensor(known_y)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(surrogate(Xk), yk).backward()
            opt.step()

    query(seeds)
    while sent < max_queries and known_X:
        fit()
        Xk = torch.from_numpy(np.stack(known_X)).requires_grad_(True)
        out = surrogate(Xk)
        out.gather(1, torch.tensor(known_y).view(-1, 1)).sum().backward()
        sign = 1 if (len(known_X) // len(seeds)) % 2 == 0 else -1        # alternate directions, as the paper does
        new = torch.clamp(Xk + sign * step * Xk.grad.sign(), 0, 1).detach().numpy().astype(np.float32)
        before = sent
        query(new[np.random.default_rng(sent).permutation(len(new))])
        if sent == before:
            break
    if known_X:
        fit()
    report: dict[str, Any] = {"kind": "extraction", "url": target.url, "version": target.version, "queries": sent,
                              "refused": refused, "block_rate": round(refused / max(1, sent), 4),
                              "flagged_after_queries": flagged_at, "labelled": len(known_X)}
    if champion_labels is not None and known_X:
        with torch.no_grad():
            pred = surrogate(torch.from_numpy(test)).argmax(1).numpy()
        report["surrogate_agreement"] = round(float((pred == champion_labels).mean()), 4)
        report["agreement_rows"] = len(test)
    return report
