"""Key folder creation, permissions, document signatures and key rotation."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core import canonical
from stages.trust import keys, signing
from stages.core.errors import IntegrityError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def kdir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "keys"
    monkeypatch.setenv("MLSEC_KEY_DIR", str(path))
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_dir_follows_env_and_defaults_to_home(kdir, monkeypatch):
    assert keys.key_dir() == kdir
    monkeypatch.delenv("MLSEC_KEY_DIR")
    assert keys.key_dir() == Path.home() / ".config" / "mlsec" / "keys"


def test_keys_created_private_and_reused(kdir):
    signer = keys.load_signer()
    assert _mode(kdir) == 0o700
    for name in (keys.DOC_PRIVATE, keys.MODEL_PRIVATE):
        assert _mode(kdir / name) == 0o600
    for name in (keys.DOC_PUBLIC, keys.MODEL_PUBLIC):
        assert (kdir / name).read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(signer.key_id) == 64 and signer.short_id == signer.key_id[:16]
    assert "PRIVATE" not in repr(signer)
    before = (kdir / keys.DOC_PRIVATE).read_bytes()
    again = keys.load_signer()
    assert again.key_id == signer.key_id
    assert (kdir / keys.DOC_PRIVATE).read_bytes() == before
    assert keys.model_key().private_path == kdir / keys.MODEL_PRIVATE


def test_concurrent_first_use_makes_one_key_pair(kdir):
    code = "from stages.trust import keys; print(keys.load_signer().key_id, keys.model_key().key_id)"
    env = {**os.environ, "MLSEC_KEY_DIR": str(kdir), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
        for _ in range(4)
    ]
    outs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1


@pytest.mark.parametrize("name", [keys.DOC_PRIVATE, keys.MODEL_PRIVATE])
def test_world_readable_private_key_refused(kdir, name):
    keys.ensure_keys()
    (kdir / name).chmod(0o644)
    with pytest.raises(IntegrityError, match=r"group/other permissions \(mode 0644\)"):
        keys.load_signer() if name == keys.DOC_PRIVATE else keys.model_key()


def test_group_writable_key_folder_refused(kdir):
    keys.ensure_keys()
    kdir.chmod(0o770)
    with pytest.raises(IntegrityError, match="writable by group/other"):
        keys.load_signer()


def test_malformed_and_symlinked_keys_refused(kdir, tmp_path):
    keys.ensure_keys()
    (kdir / keys.DOC_PRIVATE).write_bytes(b"not a key")
    with pytest.raises(IntegrityError, match="malformed"):
        keys.load_signer()
    (kdir / keys.DOC_PRIVATE).unlink()
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(b"x")
    elsewhere.chmod(0o600)
    (kdir / keys.DOC_PRIVATE).symlink_to(elsewhere)
    with pytest.raises(IntegrityError, match="unreadable"):
        keys.load_signer()


def test_wrong_key_type_refused(kdir):
    keys.ensure_keys()
    p256 = (kdir / keys.MODEL_PRIVATE).read_bytes()
    (kdir / keys.DOC_PRIVATE).unlink()
    (kdir / keys.DOC_PRIVATE).write_bytes(p256)
    (kdir / keys.DOC_PRIVATE).chmod(0o600)
    with pytest.raises(IntegrityError, match="expected an Ed25519 private key"):
        keys.load_signer()


def test_missing_private_with_public_present_is_not_silently_replaced(kdir):
    keys.ensure_keys()
    (kdir / keys.DOC_PRIVATE).unlink()
    with pytest.raises(IntegrityError, match="is missing"):
        keys.load_signer()


def test_document_round_trip_and_tamper(kdir):
    doc = signing.sign_document({"stage": "gate", "passed": True, "note": "ünïcode"})
    assert doc["signature"]["alg"] == "ed25519"
    assert signing.verify_document(doc) == {"stage": "gate", "passed": True, "note": "ünïcode"}
    tampered = {"payload": {**doc["payload"], "passed": False}, "signature": doc["signature"]}
    with pytest.raises(IntegrityError, match="bad signature by key"):
        signing.verify_document(tampered)
    with pytest.raises(IntegrityError, match="malformed signed document"):
        signing.verify_document({"payload": doc["payload"]})


def test_canonical_json_is_stable():
    assert canonical.canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


def test_rotation_keeps_old_documents_and_refuses_unknown_key(kdir):
    old_doc = signing.sign_document({"n": 1})
    old_id, new_id = keys.rotate_keys()
    assert old_id == old_doc["signature"]["key_id"] and new_id != old_id
    assert (kdir / keys.TRUSTED_DIR / f"{old_id}.pub.pem").exists()
    assert keys.load_signer().key_id == new_id
    assert signing.verify_document(old_doc) == {"n": 1}
    new_doc = signing.sign_document({"n": 2})
    assert new_doc["signature"]["key_id"] == new_id
    assert signing.verify_document(new_doc) == {"n": 2}
    assert len(keys.trusted_model_public_keys()) == 2
    # revoking the retired key makes its documents unverifiable
    (kdir / keys.TRUSTED_DIR / f"{old_id}.pub.pem").unlink()
    with pytest.raises(IntegrityError, match=f"signed by unknown key {old_id[:16]}"):
        signing.verify_document(old_doc)


def test_signature_by_foreign_key_refused(kdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLSEC_KEY_DIR", str(tmp_path / "other"))
    foreign = signing.sign_document({"x": 1})
    monkeypatch.setenv("MLSEC_KEY_DIR", str(kdir))
    keys.ensure_keys()
    with pytest.raises(IntegrityError, match="signed by unknown key"):
        signing.verify_document(foreign)


def test_trusted_file_name_must_match_key(kdir):
    keys.ensure_keys()
    tdir = kdir / keys.TRUSTED_DIR
    tdir.mkdir(mode=0o700)
    (tdir / ("0" * 64 + ".pub.pem")).write_bytes((kdir / keys.DOC_PUBLIC).read_bytes())
    with pytest.raises(IntegrityError, match="does not hold key"):
        keys.trusted_keys()


def test_bad_base64_signature_refused(kdir):
    signer = keys.load_signer()
    with pytest.raises(IntegrityError, match="bad signature"):
        signing.verify_signature(b"data", "%%%", key_id=signer.key_id)
    sig = signer.sign(b"data")
    signing.verify_signature(b"data", sig, key_id=signer.key_id)
