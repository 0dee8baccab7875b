"""Where things live: one project root, one folder per run, one place for each concern.

The root is ``$MLSEC_ROOT`` when set, else the current directory. Everything the pipeline
writes stays under it, except the signing keys (``stages.trust.keys``, outside git).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.core.errors import InvalidInput

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls) -> "Workspace":
        return cls(Path(os.environ.get("MLSEC_ROOT") or os.getcwd()).resolve())

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def prepared_dir(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def reference_dir(self) -> Path:
        return self.root / "data" / "reference"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def ledger_path(self) -> Path:
        return self.audit_dir / "ledger.jsonl"

    @property
    def mlflow_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID_RE.match(run_id):
            raise InvalidInput(f"invalid run id {run_id!r}: letters, digits, '.', '_' and '-' only")
        return self.runs_dir / run_id


# the project's own settings, beside the packages: the template 'mlsec init' copies into a workspace
DEFAULT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def write_default_params(root: Path) -> str:
    """Give the workspace ``root`` the project's ``params.yaml`` unless it has one (an edited
    file is never replaced): ``written`` or ``present``. Raises InvalidInput when the
    installation carries no defaults to copy."""
    target = Path(root) / "params.yaml"
    if target.exists():
        return "present"
    if not DEFAULT_PARAMS.is_file():
        raise InvalidInput(f"no default params.yaml beside the installed packages ({DEFAULT_PARAMS}); write {target} by hand")
    from stages.core.params import params_from_dict  # here: params imports nothing of this module, and few commands need it

    text = workspace_params_text(DEFAULT_PARAMS.read_text(), Path(root).resolve().name)
    params_from_dict(yaml.safe_load(text))   # the template is itself valid, or nothing is written
    target.write_text(text)
    return "written"


def workspace_params_text(template: str, folder: str) -> str:
    """The project's ``params.yaml`` for a new workspace: every setting as the project has it,
    but the ``project:`` description its own, so that a model trained there is not
    registered, carded and inventoried as the digits reference pipeline: the folder's name
    as the model's name, purpose and intended use left for the owner to write (an empty
    field shows as not stated on the model card), no known limits."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder).strip("-_.")[:64] or "mlsec-model"
    lines, out, in_project, in_limits = template.splitlines(keepends=True), [], False, False
    for line in lines:
        if not line.startswith((" ", "#")) and line.strip():
            in_project, in_limits = line.startswith("project:"), False
        if in_project:
            key = line.strip().split(":", 1)[0]
            if in_limits and line.startswith("    "):
                continue     # the reference pipeline's limits
            in_limits = False
            if key == "name":
                line = f"  name: {name}            # MLflow experiment and registered model name\n"
            elif key == "purpose":
                line = "  purpose: ''                  # what the model decides, for the model card and the inventory\n"
            elif key == "intended_use":
                line = "  intended_use: ''             # who may rely on it, and for what\n"
            elif key == "known_limits":
                line, in_limits = "  known_limits: []             # what it must not be trusted with\n", True
        out.append(line)
    return "".join(out)


def new_run_id() -> str:
    """Sortable, unique: UTC time plus 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def actor() -> str:
    """Who is acting: ``$MLSEC_ACTOR`` when set (CI, service accounts), else the OS user."""
    name = os.environ.get("MLSEC_ACTOR")
    if name:
        return name
    try:

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return f"uid:{os.getuid()}"


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
