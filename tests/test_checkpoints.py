"""Checkpoints as an attacker sees them: a planted, forged, edited or borrowed checkpoint is
refused (exit 4, an integrity.violation in the ledger), never trained from or skipped to."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError
from stages.core.params import TrainParams
from stages.ml.training import fit
from stages.ml.training.checkpoints import MAGIC, CheckpointRefused
from tests.support import sealed_epoch, sealed_store


@pytest.fixture(scope="module")
def small():
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None][:160]
    return X, d.target.astype(np.int64)[:160]


def params(**kw) -> TrainParams:
    raw = {"mode": "standard", "epochs": 2, "batch_size": 64, "lr": 0.005, "seed": 0, "device": "cpu", "amp": False,
           "adversarial": {"method": "fgsm_rs", "epsilon": 0.1}, "dp": {"target_epsilon": None, "noise_multiplier": 1.0,
                                                                        "accountant": "rdp"}}
    raw.update(kw)
    return TrainParams.model_validate(raw)


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", raw[len(MAGIC):len(MAGIC) + 4])
    return json.loads(raw[len(MAGIC) + 4:len(MAGIC) + 4 + n]), raw[len(MAGIC) + 4 + n:]


def _join(header: dict, body: bytes) -> bytes:
    head = canonical_json(header)
    return MAGIC + struct.pack(">I", len(head)) + head + body


def _finished(tmp_path, small, **kw):
    X, y = small
    fit(X, y, params=params(**kw), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)
    assert sealed_epoch(tmp_path) == params(**kw).epochs
    return (tmp_path / "last.pt").read_bytes()


def _skips_training(monkeypatch) -> list:
    from stages.ml.training import loop

    ran: list = []
    real = loop._run_epoch
    monkeypatch.setattr(loop, "_run_epoch", lambda *a, **k: ran.append(1) or real(*a, **k))
    return ran


def test_a_planted_plain_checkpoint_at_the_last_epoch_is_refused(small, tmp_path, monkeypatch):
    """The attack of the issue: a torch file at the final epoch would skip training entirely."""
    X, y = small
    junk = torch.nn.Linear(64, 10).state_dict()
    torch.save({"format": 1, "fingerprint": "x", "epoch": 2, "model": junk, "history": []}, tmp_path / "last.pt")
    ran = _skips_training(monkeypatch)
    with pytest.raises(CheckpointRefused, match="not a sealed checkpoint"):
        fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)
    assert not ran and (tmp_path / "last.pt").exists()  # nothing trained, the evidence kept


def test_a_checkpoint_sealed_with_another_key_is_refused(small, tmp_path):
    X, y = small
    fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path, key=b"m" * 32), progress=False)
    with pytest.raises(CheckpointRefused, match="seal does not verify"):
        fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)


def test_a_genuine_checkpoint_of_another_run_is_refused(small, tmp_path):
    X, y = small
    fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path, run_id="earlier"), progress=False)
    with pytest.raises(CheckpointRefused, match="sealed for run 'earlier', not for run 'r1'"):
        fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)


@pytest.mark.parametrize("edit", ["epoch", "payload", "mac_recomputed_without_key"])
def test_edited_checkpoints_are_refused(small, tmp_path, edit):
    X, y = small
    raw = _finished(tmp_path, small, epochs=2)
    header, body = _split(raw)
    if edit == "epoch":
        header["epoch"] = 5  # claim more epochs were trained
    elif edit == "payload":
        body = body[:-40] + bytes(b ^ 1 for b in body[-40:])
    else:  # the attacker rewrites the weights and seals them with a key of their own
        header["payload_sha256"] = hashlib.sha256(body).hexdigest()
        header["mac"] = hmac.new(b"a" * 32, canonical_json({k: v for k, v in header.items() if k != "mac"}),
                                 hashlib.sha256).hexdigest()
    (tmp_path / "last.pt").write_bytes(_join(header, body))
    with pytest.raises(CheckpointRefused):
        fit(X, y, params=params(epochs=5), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)


def test_a_finished_genuine_checkpoint_resumes_without_training(small, tmp_path, monkeypatch):
    X, y = small
    first = fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)
    ran = _skips_training(monkeypatch)
    again = fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)
    assert not ran and again.history == first.history


def test_a_stale_checkpoint_of_the_same_run_is_not_resumed(small, tmp_path, monkeypatch):
    X, y = small
    fit(X, y, params=params(epochs=1), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)
    store = sealed_store(tmp_path)
    ran = _skips_training(monkeypatch)
    result = fit(X, y, params=params(epochs=1, lr=0.01), num_classes=10, checkpoints=store, progress=False)
    assert len(ran) == 1 and [h["epoch"] for h in result.history] == [1]
    assert store.discarded and "params" in store.discarded
    flipped = y.copy()
    flipped[:5] = (flipped[:5] + 1) % 10
    store = sealed_store(tmp_path)
    fit(X, flipped, params=params(epochs=1, lr=0.01), num_classes=10, checkpoints=store, progress=False)
    assert "data" in store.discarded


def test_a_dp_run_restores_its_accountant_only_through_the_seal(small, tmp_path):
    """An accountant rewritten to an empty history would understate the epsilon spent."""
    X, y = small
    raw = _finished(tmp_path, small, mode="dp", epochs=1)
    header, body = _split(raw)
    payload = torch.load(__import__("io").BytesIO(body), weights_only=True)
    assert payload["accountant"]["history"]
    payload["accountant"]["history"] = []
    buf = __import__("io").BytesIO()
    torch.save(payload, buf)
    header["payload_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (tmp_path / "last.pt").write_bytes(_join(header, buf.getvalue()))
    with pytest.raises(CheckpointRefused, match="seal does not verify"):
        fit(X, y, params=params(mode="dp", epochs=2), num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)


def test_a_symlinked_checkpoint_is_refused(small, tmp_path):
    X, y = small
    other = tmp_path / "elsewhere"
    raw = _finished(other, small, epochs=2)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "last.pt").symlink_to(other / "last.pt")
    assert raw
    with pytest.raises(CheckpointRefused, match="cannot be opened safely"):
        fit(X, y, params=params(), num_classes=10, checkpoints=sealed_store(tmp_path / "ck"), progress=False)


def test_refusal_is_an_integrity_error():
    assert issubclass(CheckpointRefused, IntegrityError) and CheckpointRefused.exit_code == 4
