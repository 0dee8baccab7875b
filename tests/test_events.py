"""The event catalogue: one place in code, the same in docs/events.md, refused when misused,
and delivered to a real Prefect server."""

from __future__ import annotations

import re
import time
import uuid

import pytest

from stages.core import events
from stages.core.errors import InvalidInput
from tests.support import ROOT


def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "docs" / "events.md").read_text().splitlines():
        m = re.match(r"^\| `(mlsec\.[a-z.-]+)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_docs_list_every_event_with_its_payload_keys():
    rows = _doc_rows()
    assert set(rows) == set(events.CATALOGUE)
    for name, spec in events.CATALOGUE.items():
        payload_cell = rows[name].rstrip(" |").rsplit("|", 1)[1]
        for key in spec.required:
            assert re.search(rf"(?<!\*)`{key}`", payload_cell), f"{name}: required key {key} not documented"
        for key in spec.optional:
            assert f"*`{key}`*" in payload_cell, f"{name}: optional key {key} not documented as optional"


def test_constants_are_the_catalogue():
    names = {v for k, v in vars(events).items() if k.isupper() and isinstance(v, str) and v.startswith("mlsec.") and k != "RESOURCE_PREFIX"}
    assert names == set(events.CATALOGUE)


@pytest.mark.parametrize("name,payload,match", [
    ("mlsec.nothing", {"model": "m"}, "unknown event"),
    (events.DATA_CHANGED, {"model": "m", "source": "d.npz"}, "lacks payload key"),
    (events.DATA_CHANGED, {"model": "m", "source": "d.npz", "source_sha256": "ab", "extra": 1}, "does not list"),
    (events.RETRAIN_REQUESTED, {"model": "", "reason": "x"}, "non-empty"),
    (events.MONITOR_DRIFT, {"model": "m", "version": "1", "statistic": "ks", "value": float("nan"), "threshold": 0.1},
     "plain JSON"),
])
def test_bad_payloads_are_refused(name, payload, match):
    with pytest.raises(InvalidInput, match=match):
        events.check_payload(name, payload)


def test_emit_reaches_the_server(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    model = f"m-{uuid.uuid4().hex[:8]}"
    payload = {"model": model, "reason": "drift on window 7", "alert": events.MONITOR_DRIFT}
    sent = events.emit(events.RETRAIN_REQUESTED, payload)
    events.flush()
    assert sent is not None
    flt = EventFilter(event=EventNameFilter(name=[events.RETRAIN_REQUESTED]),
                      resource=EventResourceFilter(id=[f"mlsec.model.{model}"]))
    deadline = time.time() + 30
    found = []
    with get_client(sync_client=True) as client:
        while time.time() < deadline and not found:
            found = client.read_events(filter=flt, limit=50).events
            time.sleep(0.5)
    assert len(found) == 1
    assert found[0].payload == payload
    assert found[0].resource.id == f"mlsec.model.{model}"
