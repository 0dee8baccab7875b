"""The two runners stay in step: dvc.yaml lists the same stages, in the same order, as the
Prefect flow, and each DVC stage runs the same core (``python -m stages.<name>``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from flows.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_and_prefect_stage_lists_match():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    for name, stage in dvc.items():
        assert stage["cmd"].startswith(f"python -m stages.{name} "), stage["cmd"]
        assert f"stages/{name}.py" in stage["deps"]
        module = importlib.import_module(f"stages.{name}")
        assert callable(module.run) and callable(module.main)


def test_dvc_params_name_real_sections():
    from stages.core.params import load_params

    params = load_params(ROOT / "params.yaml").as_dict()
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in dvc.values():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, key
                node = node[part]
