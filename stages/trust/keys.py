"""The pipeline's signing keys: creation, loading, trust and rotation (signatures: ``stages.trust.signing``).

Where the keys live
-------------------
``key_dir()`` is ``$MLSEC_KEY_DIR`` when set, else ``~/.config/mlsec/keys``. It is outside
git, MLflow and the ledger; nothing in this module logs or returns private key bytes.
On first use the folder is created (mode 0700) with two key pairs::

    signing_ed25519.pem        Ed25519 private key (mode 0600): signs documents and
    signing_ed25519.pub.pem    DSSE attestations (manifests, verdicts, provenance)
    model_ecdsa_p256.pem       ECDSA P-256 private key (mode 0600): signs model folders
    model_ecdsa_p256.pub.pem   through the OpenSSF ``model_signing`` package
    trusted/<key_id>.pub.pem   public keys of retired pairs, still trusted to verify
    .keys.lock                 lock file: creation, loading and rotation are serialised

Creation is race-safe: it runs under an exclusive lock and every key file is created with
``O_CREAT | O_EXCL``, so two processes starting at once end with one key pair, and an
existing key is never overwritten. A private key file that is readable or writable by
group/other, owned by another user, a symlink, unreadable or malformed is refused with
``IntegrityError`` (exit code 4); so is a key folder that group/other can write to.

A key id is the SHA-256 (hex, 64 chars) of the raw public key bytes (the 32-byte Ed25519
key; the 65-byte uncompressed P-256 point). Messages show the first 16 hex chars.

Rotation, revocation and trusting another machine's key: ``docs/keys.md``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from filelock import FileLock, Timeout

from stages.core.errors import IntegrityError

ENV_KEY_DIR = "MLSEC_KEY_DIR"
DOC_PRIVATE = "signing_ed25519.pem"
DOC_PUBLIC = "signing_ed25519.pub.pem"
MODEL_PRIVATE = "model_ecdsa_p256.pem"
MODEL_PUBLIC = "model_ecdsa_p256.pub.pem"
TRUSTED_DIR = "trusted"
LOCK_NAME = ".keys.lock"
LOCK_TIMEOUT_S = 30.0
_MAX_KEY_FILE_BYTES = 64 * 1024
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def key_dir() -> Path:
    """The key folder: ``$MLSEC_KEY_DIR`` if set, else ``~/.config/mlsec/keys``."""
    env = os.environ.get(ENV_KEY_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "mlsec" / "keys"


def short_id(key_id: str) -> str:
    """Display form of a key id: its first 16 hex characters."""
    return key_id[:16]


def _check_dir(path: Path) -> None:
    try:
        st = path.lstat()
    except OSError as exc:
        raise IntegrityError(f"key folder {path} is not accessible: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) and path.name == TRUSTED_DIR:
        raise IntegrityError(f"key folder {path} is a symlink; refusing it")
    if stat.S_ISLNK(st.st_mode):
        st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError(f"key folder {path} is not a directory")
    if st.st_uid != os.getuid():
        raise IntegrityError(f"key folder {path} is owned by uid {st.st_uid}, not by this user")
    if st.st_mode & 0o022:
        raise IntegrityError(
            f"key folder {path} is writable by group/other (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 700 {path}"
        )


def _read_key_file(path: Path, *, private: bool) -> bytes:
    """Read a key file without following symlinks, refusing loose permissions."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IntegrityError(f"key file {path} is unreadable: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"key file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise IntegrityError(f"key file {path} is owned by uid {st.st_uid}, not by this user")
        mode = stat.S_IMODE(st.st_mode)
        loose = 0o077 if private else 0o022
        if mode & loose:
            what = "group/other permissions" if private else "group/other write permission"
            raise IntegrityError(
                f"key file {path} has {what} (mode {mode:04o}); run: chmod 600 {path}"
            )
        if st.st_size > _MAX_KEY_FILE_BYTES:
            raise IntegrityError(f"key file {path} is malformed: {st.st_size} bytes is too large")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise IntegrityError(f"key file {path} is unreadable: {exc.strerror}") from None
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` exclusively (never overwrite) with ``mode`` and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (never) widened it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def _raw_public_bytes(public_key: PublicKey) -> bytes:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def key_id_of(public_key: PublicKey) -> str:
    """SHA-256 hex of the raw public key bytes (64 hex chars)."""
    return hashlib.sha256(_raw_public_bytes(public_key)).hexdigest()


def _public_pem(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _is_p256(key: Any) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def _parse_private(path: Path, data: bytes, *, kind: str):
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IntegrityError(f"key file {path} is malformed (not an unencrypted PEM private key)") from None
    if kind == "ed25519" and not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IntegrityError(f"key file {path} is malformed: expected an Ed25519 private key")
    if kind == "p256" and not _is_p256(key):
        raise IntegrityError(f"key file {path} is malformed: expected an ECDSA P-256 private key")
    return key


def _parse_public(path: Path, data: bytes) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IntegrityError(f"key file {path} is malformed (not a PEM public key)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey) and not _is_p256(key):
        raise IntegrityError(f"key file {path} holds an unsupported key type {type(key).__name__}")
    return key


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise creation, loading and rotation of keys (``<key_dir>/.keys.lock``)."""
    try:
        with FileLock(str(directory / LOCK_NAME), timeout=LOCK_TIMEOUT_S, mode=0o600):
            yield
    except Timeout:
        raise IntegrityError(f"could not lock key folder {directory} within {LOCK_TIMEOUT_S:.0f} s") from None


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise IntegrityError(f"cannot create key folder {directory}: {exc.strerror}") from None
    _check_dir(directory)


def _ensure_pair(directory: Path, private_name: str, public_name: str, kind: str) -> None:
    """Create one key pair if absent (caller holds the lock). Never overwrites."""
    priv_path, pub_path = directory / private_name, directory / public_name
    if os.path.lexists(priv_path):
        key = _parse_private(priv_path, _read_key_file(priv_path, private=True), kind=kind)
        if not os.path.lexists(pub_path):  # an interrupted creation: derive the public half
            _write_new_file(pub_path, _public_pem(key.public_key()), mode=0o644)
        return
    if os.path.lexists(pub_path):
        raise IntegrityError(
            f"key file {priv_path} is missing but {pub_path.name} exists; restore the private"
            " key from backup or move the public key into trusted/ and retry"
        )
    new_key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    _write_new_file(priv_path, _private_pem(new_key), mode=0o600)
    _write_new_file(pub_path, _public_pem(new_key.public_key()), mode=0o644)


def ensure_keys() -> Path:
    """Create the key folder and both key pairs if missing; return the folder.

    Safe to call from several processes at once; existing keys are kept as they are.
    """
    directory = key_dir()
    _make_dir(directory)
    if all(os.path.lexists(directory / n) for n in (DOC_PRIVATE, DOC_PUBLIC, MODEL_PRIVATE, MODEL_PUBLIC)):
        return directory
    with _locked(directory):
        _ensure_pair(directory, DOC_PRIVATE, DOC_PUBLIC, "ed25519")
        _ensure_pair(directory, MODEL_PRIVATE, MODEL_PUBLIC, "p256")
    return directory


def _load_private(directory: Path, private_name: str, public_name: str, kind: str):
    priv_path, pub_path = directory / private_name, directory / public_name
    key = _parse_private(priv_path, _read_key_file(priv_path, private=True), kind=kind)
    try:
        pub = _parse_public(pub_path, _read_key_file(pub_path, private=False))
    except FileNotFoundError:
        raise IntegrityError(f"key file {pub_path} is missing") from None
    if _raw_public_bytes(pub) != _raw_public_bytes(key.public_key()):
        raise IntegrityError(f"key file {pub_path} does not match private key {priv_path.name}")
    return key


@dataclass(frozen=True)
class Signer:
    """The current Ed25519 document key. ``repr`` never shows the private key."""

    key_id: str
    public_pem: str
    _private: ed25519.Ed25519PrivateKey

    @property
    def short_id(self) -> str:
        return short_id(self.key_id)

    def sign(self, data: bytes) -> str:
        """Ed25519 signature of ``data``, base64 (standard alphabet)."""
        return base64.b64encode(self._private.sign(bytes(data))).decode("ascii")

    def __repr__(self) -> str:
        return f"Signer(alg='ed25519', key_id={self.short_id!r})"


def load_signer() -> Signer:
    """The current document signer, creating the keys on first use."""
    directory = ensure_keys()
    try:
        with _locked(directory):
            key = _load_private(directory, DOC_PRIVATE, DOC_PUBLIC, "ed25519")
    except FileNotFoundError as exc:
        raise IntegrityError(f"key file {exc.filename} is missing") from None
    pub = key.public_key()
    return Signer(key_id=key_id_of(pub), public_pem=_public_pem(pub).decode("ascii"), _private=key)


@dataclass(frozen=True)
class ModelKey:
    """Paths of the current ECDSA P-256 model-signing pair, checked before use."""

    key_id: str
    private_path: Path
    public_path: Path


def model_key() -> ModelKey:
    """The current P-256 pair for ``model_signing`` (created on first use, then checked)."""
    directory = ensure_keys()
    try:
        with _locked(directory):
            key = _load_private(directory, MODEL_PRIVATE, MODEL_PUBLIC, "p256")
    except FileNotFoundError as exc:
        raise IntegrityError(f"key file {exc.filename} is missing") from None
    return ModelKey(
        key_id=key_id_of(key.public_key()),
        private_path=directory / MODEL_PRIVATE,
        public_path=directory / MODEL_PUBLIC,
    )


def _trusted_files(directory: Path) -> Iterator[tuple[str, Path, PublicKey]]:
    tdir = directory / TRUSTED_DIR
    if not os.path.lexists(tdir):
        return
    _check_dir(tdir)
    for path in sorted(tdir.glob("*.pub.pem")):
        key = _parse_public(path, _read_key_file(path, private=False))
        kid = key_id_of(key)
        if path.name != f"{kid}.pub.pem":
            raise IntegrityError(f"trusted key file {path.name} does not hold key {short_id(kid)}")
        yield kid, path, key


def trusted_keys() -> dict[str, PublicKey]:
    """Every key allowed to verify: current public keys plus ``trusted/*.pub.pem``.

    Reads only; does not create a key folder.
    """
    directory = key_dir()
    out: dict[str, PublicKey] = {}
    if not os.path.lexists(directory):
        return out
    _check_dir(directory)
    for name in (DOC_PUBLIC, MODEL_PUBLIC):
        path = directory / name
        if os.path.lexists(path):
            key = _parse_public(path, _read_key_file(path, private=False))
            out[key_id_of(key)] = key
    for kid, _path, key in _trusted_files(directory):
        out[kid] = key
    return out


def trusted_model_public_keys() -> list[tuple[str, Path]]:
    """(key_id, PEM path) of trusted P-256 keys: the current one first, then retired ones."""
    current = model_key()
    out = [(current.key_id, current.public_path)]
    for kid, path, key in _trusted_files(key_dir()):
        if _is_p256(key) and kid != current.key_id:
            out.append((kid, path))
    return out


def rotate_keys() -> tuple[str, str]:
    """Retire both key pairs and create new ones; return the Ed25519 ``(old_id, new_id)``.

    The old public keys move to ``trusted/`` so that what they signed still verifies;
    the old private keys are deleted. See the module docstring.
    """
    directory = ensure_keys()
    tdir = directory / TRUSTED_DIR
    with _locked(directory):
        old_doc = _load_private(directory, DOC_PRIVATE, DOC_PUBLIC, "ed25519")
        old_model = _load_private(directory, MODEL_PRIVATE, MODEL_PUBLIC, "p256")
        try:
            tdir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise IntegrityError(f"cannot create {tdir}: {exc.strerror}") from None
        _check_dir(tdir)
        for key in (old_doc, old_model):
            pub = key.public_key()
            target = tdir / f"{key_id_of(pub)}.pub.pem"
            if not os.path.lexists(target):
                _write_new_file(target, _public_pem(pub), mode=0o644)
        # Delete the old pairs, then create the new ones with O_EXCL as on first use.
        for name in (DOC_PUBLIC, DOC_PRIVATE, MODEL_PUBLIC, MODEL_PRIVATE):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        _ensure_pair(directory, DOC_PRIVATE, DOC_PUBLIC, "ed25519")
        _ensure_pair(directory, MODEL_PRIVATE, MODEL_PUBLIC, "p256")
    return key_id_of(old_doc.public_key()), load_signer().key_id
