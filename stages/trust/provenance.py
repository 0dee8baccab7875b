"""Where the bytes came from: code version, environment lock, and DVC data versioning.

The manifest written by ingest names, for the prepared data: every file's SHA-256 and size,
the Merkle root over them, the source, the ingest time, the git commit of the code, the DVC
hash of the data folder and the digest of the effective params, signed with the pipeline's
Ed25519 key. DVC keeps MD5 content addresses; our SHA-256 manifest sits on top, so a
collision in DVC's addressing cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import secrets
import shutil
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import yaml

from stages.core.errors import IntegrityError, PipelineError


# Paths the pipeline itself writes, or that are recorded by their own digest: DVC's data
# pointers and config (ingest's own ``dvc add`` rewrites them), the settings
# (``params_sha256``) and the workspace's run records, audit trail and stores.
NOT_CODE = ("data", ".dvc", ".dvc-remote", "dvc.lock", "params.yaml", "runs", "audit", "mlartifacts", "mlruns",
            "mlflow.db", ".prefect")


def git_state(root: Path) -> dict[str, Any]:
    """The code version: HEAD commit, and whether the code differs from it.

    ``dirty`` is True when a tracked file outside :data:`NOT_CODE` differs from HEAD or a
    file git does not ignore was added outside them; ``dirty_files`` names up to 20 of them.
    None when the folder is not a git repository or has no commit.
    """
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD") or None
        changed = git("status", "--porcelain", "--untracked-files=normal", "--", ".",
                      *(f":(exclude){p}" for p in NOT_CODE)).splitlines() if commit else []
    except (OSError, subprocess.SubprocessError):
        commit, changed = None, []
    files = [line[3:] for line in changed if line.strip()]
    return {"commit": commit, "dirty": bool(files) if commit else None, "dirty_files": files[:20]}


def git_show(root: Path, relpath: str) -> tuple[str | None, str]:
    """``relpath``'s text as committed at HEAD, and a description of where it came from;
    ``(None, reason)`` when the folder is not a git repository or the file is not committed."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if commit.returncode != 0:
            return None, "no commit"
        proc = subprocess.run(["git", "-C", str(root), "show", f"HEAD:./{relpath}"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, "git unavailable"
    if proc.returncode != 0:
        return None, f"{relpath} not committed"
    return proc.stdout, f"{relpath} at commit {commit.stdout.strip()[:12]}"


def environment_lock() -> tuple[str, str]:
    """``pip freeze``-style lock of the running environment and its SHA-256."""
    lines = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]},
                   key=str.lower)
    text = "\n".join(lines) + "\n"
    return text, hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC prints hints on stdout; keep stdout for the command line's own output."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _repo(root: Path):
    from dvc.exceptions import (
        NotDvcRepoError,  # DVC: slow to import, only when data is versioned
    )
    from dvc.repo import Repo  # DVC: slow to import, only when data is versioned

    try:
        return Repo(str(root))
    except NotDvcRepoError:
        raise PipelineError(f"{root} is not a DVC repository: run 'mlsec init' (git init + dvc init + a local remote)") from None


PUSH_DELAYS_S = (2, 5, 15)  # backoff between tries of a DVC push (a remote store's I/O, not a check)


def _push(repo, folder: Path) -> None:
    """``dvc push`` of ``folder``, tried again after each delay of :data:`PUSH_DELAYS_S`."""
    for delay in (*PUSH_DELAYS_S, None):
        try:
            repo.push(targets=[str(folder)])
            return
        except Exception:  # noqa: BLE001 - DVC raises many kinds; the last one is reported
            if delay is None:
                raise
            logging.getLogger(__name__).warning("dvc push of %s failed; trying again in %s s", folder, delay)
            time.sleep(delay)


def dvc_add(root: Path, folder: Path, *, push: bool) -> dict[str, Any]:
    """``dvc add`` the folder (and push it to the default remote); return its DVC record."""
    with _quiet_dvc():
        with _repo(root) as repo:
            try:
                stages = repo.add([str(folder)])
                out = stages[0].outs[0]
                record = {"md5": out.hash_info.value, "path": str(folder.relative_to(root)),
                          "dvc_file": str(Path(stages[0].path).relative_to(root)), "pushed": False, "remote": None}
                if push:
                    remote = repo.config.get("core", {}).get("remote")
                    if remote:
                        _push(repo, folder)
                        record.update(pushed=True, remote=remote)
            except PipelineError:
                raise
            except Exception as err:  # noqa: BLE001 - DVC raises many kinds
                raise PipelineError(f"DVC could not version {folder}: {str(err).splitlines()[0]}") from None
    return record


def dvc_restore(root: Path, *, md5: str, dest: Path) -> None:
    """Bring back the exact data folder with DVC hash ``md5`` into ``dest`` (cache, else remote)."""
    if dest.exists() and any(dest.iterdir()):
        raise PipelineError(f"restore target {dest} exists and is not empty")
    staging = root / "data" / f".restore-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        (staging / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": "data", "hash": "md5"}]}))
        with _quiet_dvc():
            with _repo(root) as repo:
                try:
                    repo.pull(targets=[str(staging / "data.dvc")])
                except Exception as err:  # noqa: BLE001
                    raise IntegrityError(f"DVC cannot restore data {md5}: {str(err).splitlines()[0]}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging / "data", dest, dirs_exist_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def init_repo(root: Path) -> dict[str, Any]:
    """Make ``root`` a workspace: git repo, DVC (analytics off) and a local DVC remote folder."""
    root = Path(root)
    created_git = False
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q", str(root)], check=True, timeout=60)
        created_git = True
    with _quiet_dvc():
        from dvc.repo import Repo  # DVC: slow to import, only when data is versioned

        if not (root / ".dvc").exists():
            Repo.init(str(root))
        with Repo(str(root)) as repo:
            with repo.config.edit() as conf:
                conf.setdefault("core", {})["analytics"] = False
                if "remote" not in conf["core"]:
                    conf["core"]["remote"] = "local"
                    conf.setdefault("remote", {})["local"] = {"url": str(root.resolve() / ".dvc-remote")}
    (root / ".dvc-remote").mkdir(exist_ok=True)
    return {"root": str(root), "git": "created" if created_git else "present", "dvc": "ready", "remote": str(root / ".dvc-remote")}
