"""Model-folder signatures: the OpenSSF ``model_signing`` package with the pipeline's ECDSA
P-256 key (``stages.trust.keys``), offline, never Sigstore. Verification tries the current
key, then retired keys in ``<key_dir>/trusted/``. Every file in the folder is covered; git
files are not skipped; unsafe content is never signed.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.core.errors import IntegrityError
from stages.models.safety import SIGNATURE_NAME, assert_safe_model_dir
from stages.trust import keys


def _hashing_config(model_dir: Path, signature_path: Path, ignore: tuple[str, ...] = ()):
    from model_signing import (
        hashing,  # model_signing: slow to import, only when a model is signed or verified
    )

    ignored: list[str] = [name for name in ignore if (model_dir / name).exists()]
    try:
        ignored.append(str(signature_path.resolve().relative_to(model_dir.resolve())))
    except ValueError:
        pass  # the signature lies outside the folder
    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=ignored, ignore_git_paths=False)
    )


# model_signing reports "Signature mismatch: [<diffs>]", the list printed with repr().
_DIFF_RE = re.compile(r"(Extra files found|Missing files) in model \\*'.*?\\*': (.+?)\\*[\"']")
_HASH_RE = re.compile(r"Hash mismatch for \\*'(.+?)\\*': Expected")


def _condense(exc: BaseException, limit: int = 300) -> str:
    """One short line from model_signing's (sometimes long, multi-line) exceptions."""
    text = str(exc)
    parts = []
    for kind, names in _DIFF_RE.findall(text):
        parts.append(("extra files: " if kind.startswith("Extra") else "missing files: ") + names.strip())
    changed = _HASH_RE.findall(text)
    if changed:
        parts.append("changed: " + ", ".join(changed))
    line = "; ".join(parts) if parts else f"{type(exc).__name__}: {' '.join(text.split())}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def sign_model_dir(model_dir: Path, signature_path: Path) -> None:
    """Sign every file of ``model_dir`` into ``signature_path`` (a Sigstore bundle, JSON).

    The folder is checked with ``assert_safe_model_dir`` first: unsafe content is never
    signed. ``signature_path`` may lie inside the folder (it is then left out of the
    signed manifest) or outside it.
    """
    model_dir, signature_path = Path(model_dir), Path(signature_path)
    if not model_dir.is_dir():
        raise IntegrityError(f"cannot sign {model_dir}: not a folder")
    assert_safe_model_dir(model_dir, signature_names=_sig_names(model_dir, signature_path))
    mk = keys.model_key()
    from model_signing import (
        signing,  # model_signing: slow to import, only when a model is signed or verified
    )

    try:
        (
            signing.Config()
            .set_hashing_config(_hashing_config(model_dir, signature_path))
            .use_elliptic_key_signer(private_key=mk.private_path)
            .sign(model_dir, signature_path)
        )
    except Exception as exc:  # noqa: BLE001 - condensed into our one-line error
        raise IntegrityError(f"signing {model_dir} failed: {_condense(exc)}") from None


def _sig_names(model_dir: Path, signature_path: Path) -> tuple[str, ...]:
    names = {SIGNATURE_NAME}
    try:
        names.add(str(signature_path.resolve().relative_to(model_dir.resolve())))
    except ValueError:
        pass
    return tuple(sorted(names))


def verify_model_dir(model_dir: Path, signature_path: Path, *, ignore: tuple[str, ...] = ()) -> None:
    """Check ``model_dir`` against its signature and the safety allow-list.

    ``ignore``: top-level names left out of the comparison (a file the registry adds on
    download, checked by the caller). Raises ``IntegrityError`` naming what failed: missing
    signature, a key that is not trusted, changed, extra or missing files; ``SecurityError``
    for unsafe content.
    """
    model_dir, signature_path = Path(model_dir), Path(signature_path)
    if not model_dir.is_dir():
        raise IntegrityError(f"model folder {model_dir} is missing")
    if not signature_path.is_file():
        raise IntegrityError(f"model signature {signature_path} is missing")
    from model_signing import (
        verifying,  # model_signing: slow to import, only when a model is signed or verified
    )

    tried: list[str] = []
    for key_id, public_path in keys.trusted_model_public_keys():
        try:
            (
                verifying.Config()
                .use_elliptic_key_verifier(public_key=public_path)
                .set_hashing_config(_hashing_config(model_dir, signature_path, ignore))
                .verify(model_dir, signature_path)
            )
        except ValueError as exc:
            if str(exc).startswith("Key mismatch"):
                tried.append(keys.short_id(key_id))
                continue
            raise IntegrityError(f"model folder {model_dir} does not match its signature: {_condense(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - malformed bundle, unreadable file, ...
            raise IntegrityError(f"model signature {signature_path} cannot be verified: {_condense(exc)}") from None
        break
    else:
        raise IntegrityError(
            f"model signature {signature_path} was not made by a trusted key"
            f" (tried {', '.join(tried) or 'none'})"
        )
    assert_safe_model_dir(model_dir, signature_names=_sig_names(model_dir, signature_path))
