"""``data.unknown_category: ignore``: a table model trained with it scores a category that no
training row held as none of the column's categories (all its indicators zero), through
``load_verified_model`` and ``mlsec serve`` alike. The default (refuse) is tested on the
served table in tests/test_serving_tables.py."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from tests.serving_support import table_service
from tests.support import QUICK_POLICY, QUICK_RUN

QUICK = [*QUICK_RUN, "evaluate.membership_inference=false", "data.unknown_category=ignore"]
POLICY = [*QUICK_POLICY, "gate.max_mia_auc=null"]
SETTINGS = ["serving.reload_poll_s=60", "serving.access.rate_limit=1000/second"]


@pytest.mark.slow
def test_ignore_scores_an_unseen_category_as_all_zeros(tmp_path, prefect_server):
    from stages.models.verify import load_verified_model

    with table_service(tmp_path, overrides=QUICK, policy=POLICY, settings=SETTINGS) as served:
        model = load_verified_model(served["summary"]["model"]["uri"])
        assert model.spec["unknown_category"] == "ignore"
        records = json.loads(served["rows"].iloc[:4].to_json(orient="records"))
        west = [dict(r, clinic="west") for r in records]
        with torch.no_grad():
            known, unseen = model.prepare(records).numpy(), model.prepare(west).numpy()
            expected = torch.softmax(model(west), dim=1).numpy()
        clinic = [j for j, f in enumerate(model.spec["features"]) if f.startswith("clinic=")]
        others = [j for j in range(known.shape[1]) if j not in clinic]
        assert len(clinic) == 3 and (known[:, clinic].sum(axis=1) == 1).all()
        assert (unseen[:, clinic] == 0).all() and np.array_equal(unseen[:, others], known[:, others])
        r = httpx.post(f"{served['url']}/v1/predict", json={"inputs": west}, timeout=60,
                       headers={"Authorization": f"Bearer {served['keys']['alice']}"})
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == expected.argmax(1).tolist()
        assert np.allclose([p["probabilities"] for p in got], expected, atol=1e-4)
        status = httpx.get(f"{served['url']}/v1/status", timeout=30,
                           headers={"Authorization": f"Bearer {served['keys']['admin']}"}).json()
        assert status["champion"]["input_policy"]["unknown_category"] == "ignore"
        card = (served["ws"] / "runs" / served["summary"]["run_id"] / "card" / "model_card.md").read_text()
        assert "scored as none of its column's categories (all indicators zero) (`data.unknown_category: ignore`)" in card
