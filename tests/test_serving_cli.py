"""The serving commands' bad input: one clear line, the documented exit code, nothing started."""

from __future__ import annotations

import json

import pytest

from tests.support import run_cli


@pytest.mark.parametrize("args, code, match", [
    (["serve", "--port", "70000"], 2, "--port"),
    (["serve", "--model", "mlsec-digits/1"], 2, "by alias"),
    (["serve"], 2, "no alias 'champion'"),
    (["serve", "--set", "serving.telemetry.url=nonsense://"], 2, "telemetry.url|no alias"),
    (["clients", "add", "../evil"], 2, "client name"),
    (["clients", "add", "alice", "--rate", "lots"], 2, "not a rate"),
    (["clients", "remove", "nobody"], 2, "no client"),
    (["drill", "evasion", "--url", "ftp://127.0.0.1:1", "--key", "k"], 2, "http://"),
    (["drill", "extraction", "--url", "http://127.0.0.1:9"], 2, "client key"),
    (["drill", "evasion", "--url", "http://127.0.0.1:1", "--key", "k"], 1, "no prediction service answers"),
])
def test_bad_serving_input_is_one_line_with_its_exit_code(workspace, args, code, match):
    proc = run_cli(args, cwd=workspace, env_extra={"MLSEC_API_KEY": ""})
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    import re

    assert re.search(match, lines[0]), lines[0]


def test_clients_add_list_remove(workspace):
    added = run_cli(["clients", "add", "alice", "--budget", "10", "--json"], cwd=workspace)
    assert added.returncode == 0
    key = json.loads(added.stdout)["api_key"]
    listed = json.loads(run_cli(["clients", "list", "--json"], cwd=workspace).stdout)
    assert listed == [{"name": "alice", "role": "client", "budget": 10, "rate": None, "created": listed[0]["created"]}]
    assert key not in (workspace / "serving" / "api-keys.json").read_text()
    assert run_cli(["clients", "remove", "alice"], cwd=workspace).returncode == 0
    assert json.loads(run_cli(["clients", "list", "--json"], cwd=workspace).stdout) == []
