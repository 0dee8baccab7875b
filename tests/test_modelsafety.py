"""Model-folder signatures, unsafe-file scanning, safetensors headers and attestations."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.trust import keys
from stages.core.errors import IntegrityError, InvalidInput, SecurityError
from stages.models.attestation import build_attestation, sign_attestation, verify_attestation
from stages.models.safety import assert_safe_model_dir, scan_model_file
from stages.models.signing import sign_model_dir, verify_model_dir
from stages.models.weights import load_safetensors


@pytest.fixture(autouse=True)
def kdir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "keys"
    monkeypatch.setenv("MLSEC_KEY_DIR", str(path))
    return path


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    torch.manual_seed(0)
    save_file({"fc.weight": torch.randn(4, 3), "fc.bias": torch.zeros(4)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"arch": "mlp", "classes": 4}))
    (d / "README.md").write_text("# model card\n")
    (d / "MLmodel").write_text("flavors: {}\n")
    return d


# ---------------------------------------------------------------- signatures


def test_sign_and_verify_model_dir(model_dir):
    sig = model_dir / "model.sig"
    sign_model_dir(model_dir, sig)
    verify_model_dir(model_dir, sig)
    assert load_safetensors(model_dir / "model.safetensors")["fc.weight"].shape == (4, 3)


def test_signature_outside_folder(model_dir, tmp_path):
    sig = tmp_path / "out.sig"
    sign_model_dir(model_dir, sig)
    verify_model_dir(model_dir, sig)


def test_one_byte_change_refused(model_dir):
    sig = model_dir / "model.sig"
    sign_model_dir(model_dir, sig)
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"does not match its signature: changed: model.safetensors$"):
        verify_model_dir(model_dir, sig)


def test_added_file_refused(model_dir):
    sig = model_dir / "model.sig"
    sign_model_dir(model_dir, sig)
    (model_dir / "notes.txt").write_text("extra")
    with pytest.raises(IntegrityError, match="extra files: notes.txt"):
        verify_model_dir(model_dir, sig)


def test_added_hidden_git_file_refused(model_dir):
    sig = model_dir / "model.sig"
    sign_model_dir(model_dir, sig)
    (model_dir / ".gitattributes").write_text("* binary\n")
    with pytest.raises(IntegrityError, match="extra files: .gitattributes"):
        verify_model_dir(model_dir, sig)


def test_removed_file_refused(model_dir):
    sig = model_dir / "model.sig"
    sign_model_dir(model_dir, sig)
    (model_dir / "config.json").unlink()
    with pytest.raises(IntegrityError, match="missing files: config.json"):
        verify_model_dir(model_dir, sig)


def test_missing_signature_refused(model_dir):
    with pytest.raises(IntegrityError, match="model signature .*model.sig is missing"):
        verify_model_dir(model_dir, model_dir / "model.sig")


def test_garbage_signature_refused(model_dir):
    (model_dir / "model.sig").write_text("{}")
    with pytest.raises(IntegrityError, match="cannot be verified"):
        verify_model_dir(model_dir, model_dir / "model.sig")


def test_model_signature_survives_rotation_but_not_foreign_key(model_dir, kdir, tmp_path, monkeypatch):
    sig = model_dir / "model.sig"
    sign_model_dir(model_dir, sig)
    keys.rotate_keys()
    verify_model_dir(model_dir, sig)  # retired key in trusted/
    # a folder signed with a key we never trusted
    monkeypatch.setenv("MLSEC_KEY_DIR", str(tmp_path / "foreign"))
    foreign_sig = tmp_path / "foreign.sig"
    sign_model_dir(model_dir, foreign_sig)
    monkeypatch.setenv("MLSEC_KEY_DIR", str(kdir))
    with pytest.raises(IntegrityError, match="not made by a trusted key"):
        verify_model_dir(model_dir, foreign_sig)


# ---------------------------------------------------------------- pickle scanning


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_malicious_pickle_refused_and_never_loaded(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    (model_dir / "model.pkl").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    res = scan_model_file(model_dir / "model.pkl")
    assert not res.safe and res.kind == "pickle"
    assert res.severity in {"LIKELY_OVERTLY_MALICIOUS", "OVERTLY_MALICIOUS"}
    assert any("system" in f for f in res.findings)
    with pytest.raises(SecurityError, match=r"model.pkl: pickle-bearing file refused \(fickling LIKELY_OVERTLY_MALICIOUS, imports posix.system \(os.system\)"):
        assert_safe_model_dir(model_dir)
    with pytest.raises(SecurityError, match="model.pkl"):
        sign_model_dir(model_dir, model_dir / "model.sig")
    assert not marker.exists()


def test_malicious_torch_zip_refused_and_never_loaded(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    path = model_dir / "weights.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(SecurityError, match=r"weights.pt \(archive/data.pkl\): pickle-bearing file refused .*os.system"):
        assert_safe_model_dir(model_dir)
    assert not marker.exists()


def test_benign_torch_save_still_refused(model_dir):
    torch.save({"w": torch.zeros(2)}, model_dir / "model.pth")
    res = scan_model_file(model_dir / "model.pth")
    assert not res.safe and res.kind == "zip-pickle"
    assert "pickle is never loaded" in res.reason


def test_pickle_magic_behind_a_safe_suffix_refused(model_dir, tmp_path):
    (model_dir / "config.json").write_bytes(pickle.dumps(_Evil(tmp_path / "m"), protocol=4))
    with pytest.raises(SecurityError, match="config.json: pickle-bearing file refused"):
        assert_safe_model_dir(model_dir)


def test_unknown_format_and_symlink_refused(model_dir, tmp_path):
    (model_dir / "run.sh").write_text("echo hi\n")
    (tmp_path / "outside.txt").write_text("x")
    (model_dir / "link.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(SecurityError) as info:
        assert_safe_model_dir(model_dir)
    msg = str(info.value)
    assert "run.sh: .sh files are not an allow-listed model format" in msg
    assert "link.txt: symlinks are not allowed" in msg
    assert "\n" not in msg


def test_safe_folder_passes(model_dir):
    (model_dir / "requirements.txt").write_text("torch\n")
    (model_dir / "conda.yaml").write_text("name: x\n")
    (model_dir / "sub").mkdir()
    (model_dir / "sub" / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    kinds = {r.path.name: r.kind for r in assert_safe_model_dir(model_dir)}
    assert kinds["model.safetensors"] == "safetensors" and kinds["plot.png"] == "png"


# ---------------------------------------------------------------- safetensors headers


def _crafted(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_huge_header_length_refused(tmp_path):
    p = _crafted(tmp_path / "a.safetensors", {"x": {}}, length=2**62)
    with pytest.raises(SecurityError, match="header length 4611686018427387904 exceeds"):
        load_safetensors(p)


def test_header_longer_than_file_refused(tmp_path):
    p = _crafted(tmp_path / "a.safetensors", b"{}", length=1000)
    with pytest.raises(SecurityError, match="does not fit"):
        load_safetensors(p)


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 10**12]}, "unsafe safetensors header: .*offset"),
        ({"dtype": "F32", "shape": [10**9], "data_offsets": [0, 8]}, "unsafe safetensors header: invalid shape"),
        ({"dtype": "OBJ", "shape": [2], "data_offsets": [0, 8]}, "unsafe safetensors header: .*unknown variant `OBJ`"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "unsafe safetensors header: .*integer `-2`"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "unsafe safetensors header"),
        ({"dtype": "F32", "shape": [1] * 17 + [2], "data_offsets": [0, 8]}, "rank 18 > 16"),
    ],
)
def test_crafted_tensor_entries_refused(tmp_path, tensor, match):
    p = _crafted(tmp_path / "a.safetensors", {"t": tensor}, data=b"\0" * 8)
    with pytest.raises(SecurityError, match=match):
        load_safetensors(p)


def test_overlapping_tensors_refused(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    p = _crafted(tmp_path / "a.safetensors", header, data=b"\0" * 12)
    with pytest.raises(SecurityError, match="unsafe safetensors header: invalid offset"):
        load_safetensors(p)


def test_duplicate_keys_refused(tmp_path):
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    p = _crafted(tmp_path / "a.safetensors", raw, data=b"\0")
    with pytest.raises(SecurityError, match="duplicate key"):
        load_safetensors(p)


def test_crafted_header_in_model_dir_refused(model_dir):
    _crafted(model_dir / "evil.safetensors", {"x": {}}, length=2**40)
    with pytest.raises(SecurityError, match="evil.safetensors: unsafe safetensors header"):
        assert_safe_model_dir(model_dir)


# ---------------------------------------------------------------- attestations


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _statement(model_dir: Path) -> dict:
    return build_attestation(
        subjects={"model.safetensors": _sha((model_dir / "model.safetensors").read_bytes())},
        materials={"data/prepared/train.npz": _sha(b"data"), "git+https://example.org/mlsec@abc": _sha(b"code")},
        builder_id="https://example.org/mlsec/pipeline",
        build_type="https://example.org/mlsec/train/v1",
        parameters={"epochs": 5, "lr": 0.01, "mode": "adversarial"},
        run_id="run-42",
        started="2024-05-01T12:00:00Z",
        finished="2024-05-01T12:05:00Z",
    )


def test_attestation_round_trip(model_dir):
    stmt = _statement(model_dir)
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    bd = stmt["predicate"]["buildDefinition"]
    assert bd["externalParameters"]["epochs"] == 5 and isinstance(bd["externalParameters"]["epochs"], int)
    assert {"uri": "git+https://example.org/mlsec@abc", "digest": {"sha256": _sha(b"code")}} in bd["resolvedDependencies"]
    assert stmt["predicate"]["runDetails"]["metadata"]["invocationId"] == "run-42"
    env = sign_attestation(stmt)
    assert env["payloadType"] == "application/vnd.in-toto+json"
    expected = {"model.safetensors": _sha((model_dir / "model.safetensors").read_bytes())}
    assert verify_attestation(env, expected_subjects=expected) == stmt


def test_attestation_tampered_payload_refused(model_dir):
    env = sign_attestation(_statement(model_dir))
    stmt = json.loads(base64.b64decode(env["payload"]))
    stmt["predicate"]["buildDefinition"]["externalParameters"]["epochs"] = 1
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    with pytest.raises(IntegrityError, match="bad signature by key"):
        verify_attestation(env)


def test_attestation_subject_mismatch_refused(model_dir):
    env = sign_attestation(_statement(model_dir))
    with pytest.raises(IntegrityError, match="attestation subject mismatch: model.safetensors sha256"):
        verify_attestation(env, expected_subjects={"model.safetensors": "0" * 64})
    with pytest.raises(IntegrityError, match="not attested: other.safetensors"):
        verify_attestation(env, expected_subjects={"model.safetensors": _sha((model_dir / "model.safetensors").read_bytes()), "other.safetensors": "1" * 64})


def test_attestation_unknown_key_refused(model_dir, kdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLSEC_KEY_DIR", str(tmp_path / "foreign"))
    env = sign_attestation(_statement(model_dir))
    monkeypatch.setenv("MLSEC_KEY_DIR", str(kdir))
    keys.ensure_keys()
    with pytest.raises(IntegrityError, match="attestation signed by unknown key"):
        verify_attestation(env)


def test_attestation_survives_rotation(model_dir):
    env = sign_attestation(_statement(model_dir))
    keys.rotate_keys()
    verify_attestation(env)


def test_bad_attestation_input_rejected():
    with pytest.raises(InvalidInput, match="64 lowercase hex"):
        build_attestation(subjects={"m": "xyz"}, materials={}, builder_id="b", build_type="t",
                          parameters={}, run_id="r", started="2024-05-01T12:00:00Z", finished="2024-05-01T12:00:00Z")
    with pytest.raises(InvalidInput, match="invalid provenance"):
        build_attestation(subjects={"m": "a" * 64}, materials={}, builder_id="b", build_type="t",
                          parameters={}, run_id="r", started="yesterday", finished="2024-05-01T12:00:00Z")


def test_dsse_envelope_signs_the_spec_pae():
    """The envelope signature covers DSSE v1's pre-authentication encoding, computed here
    from the spec, not by the library that made it."""
    import base64

    from stages.trust.signing import sign_envelope, verify_envelope

    payload, ptype = b"hello world", "http://example.com/HelloWorld"
    env = sign_envelope(payload, payload_type=ptype)
    pae = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    signer = keys.load_signer()
    key = keys.trusted_keys()[signer.key_id]
    key.verify(base64.b64decode(env["signatures"][0]["sig"]), pae)  # raises if it does not cover the PAE
    assert verify_envelope(env, payload_type=ptype) == payload
    with pytest.raises(IntegrityError, match="payloadType"):
        verify_envelope(env, payload_type="application/other")
