"""The ledger's promise: any edit, deletion, reordering, insertion or truncation is caught
and the first broken line is named."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.errors import IntegrityError
from stages.trust.ledger import Ledger, verify_chain


def _ledger(tmp_path, n=6) -> Ledger:
    led = Ledger(tmp_path / "audit" / "ledger.jsonl")
    for i in range(n):
        led.append("test.event", {"i": i, "text": f"entry {i}"}, run_id="r1")
    return led


def _lines(led):
    return led.path.read_text().splitlines()


def _write(led, lines):
    led.path.write_text("\n".join(lines) + ("\n" if lines else ""))


def test_intact_chain_verifies(tmp_path):
    led = _ledger(tmp_path)
    report = verify_chain(led.path)
    assert report.ok and report.entries == 6 and report.head == led.head()


def test_edited_payload_is_named(tmp_path):
    led = _ledger(tmp_path)
    lines = _lines(led)
    entry = json.loads(lines[3])
    entry["payload"]["text"] = "rewritten"
    lines[3] = json.dumps(entry)
    _write(led, lines)
    report = verify_chain(led.path)
    assert not report.ok and report.first_bad_line == 4 and "payload" in report.reason


def test_edit_with_recomputed_hashes_breaks_the_next_link(tmp_path):
    from stages.trust.ledger import entry_hash
    from stages.core.canonical import canonical_json
    import hashlib

    led = _ledger(tmp_path)
    lines = _lines(led)
    entry = json.loads(lines[2])
    entry["payload"]["text"] = "forged"
    entry["payload_sha256"] = hashlib.sha256(canonical_json(entry["payload"])).hexdigest()
    entry["hash"] = entry_hash(entry)
    lines[2] = json.dumps(entry)
    _write(led, lines)
    report = verify_chain(led.path)
    assert not report.ok and report.first_bad_line == 3 and "signature" in report.reason  # signed over the old hash
    entry.pop("sig")
    lines[2] = json.dumps(entry)
    _write(led, lines)
    report = verify_chain(led.path)
    assert not report.ok and report.first_bad_line == 4  # unsigned: the next link breaks


@pytest.mark.parametrize("mutation", ["delete", "swap", "insert", "truncate_line", "drop_tail"])
def test_structural_tampering_is_caught(tmp_path, mutation):
    led = _ledger(tmp_path)
    lines = _lines(led)
    if mutation == "delete":
        del lines[2]
    elif mutation == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif mutation == "insert":
        lines.insert(3, lines[3])
    elif mutation == "truncate_line":
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    elif mutation == "drop_tail":
        lines = lines[:-2]
    _write(led, lines)
    report = verify_chain(led.path)
    assert not report.ok, mutation
    assert report.first_bad_line is not None


def test_anchor_from_elsewhere_catches_a_rewritten_ledger(tmp_path):
    led = _ledger(tmp_path)
    anchor = {**led.head(), "source": "MLflow run x"}
    led.path.unlink()
    led.head_path.unlink()
    _ledger(tmp_path, n=6)  # a fresh, internally valid chain with different times
    report = verify_chain(led.path, anchors=[anchor])
    assert not report.ok and "MLflow run x" in report.reason


def test_missing_signed_head_is_a_failure(tmp_path):
    led = _ledger(tmp_path)
    led.head_path.unlink()
    assert not verify_chain(led.path).ok


def test_append_refuses_a_corrupt_tail(tmp_path):
    led = _ledger(tmp_path, n=2)
    with open(led.path, "a") as fh:
        fh.write('{"seq": 2, "broken\n')
    with pytest.raises(IntegrityError, match="last line"):
        led.append("x", {})


def test_concurrent_appends_keep_one_chain(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    threads = [threading.Thread(target=lambda k=k: [led.append("t", {"k": k, "j": j}) for j in range(10)]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify_chain(led.path)
    assert report.ok and report.entries == 40


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=4), st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=255))
def test_any_single_byte_flip_is_caught(tmp_path_factory, line_no, offset, flip):
    tmp = tmp_path_factory.mktemp("flip")
    led = _ledger(tmp, n=5)
    raw = bytearray(led.path.read_bytes())
    starts = [0] + [i + 1 for i, b in enumerate(raw) if b == 0x0A][:-1]
    pos = min(starts[line_no] + offset, len(raw) - 2)
    if raw[pos] == 0x0A:
        pos -= 1
    raw[pos] ^= flip
    if raw[pos] == 0x0A:
        raw[pos] ^= 0x01
    led.path.write_bytes(bytes(raw))
    assert not verify_chain(led.path).ok


def _recompute(entry: dict, prev: str) -> dict:
    """What an attacker without the key can do: fix every digest, keep or drop the signature."""
    import hashlib

    from stages.core.canonical import canonical_json
    from stages.trust.ledger import entry_hash

    entry = {k: v for k, v in entry.items() if k != "sig"}
    entry["prev"] = prev
    entry["payload_sha256"] = hashlib.sha256(canonical_json(entry["payload"])).hexdigest()
    entry["hash"] = entry_hash(entry)
    return entry


def test_append_refuses_a_rewritten_last_entry_and_says_so(tmp_path):
    led = _ledger(tmp_path, n=4)
    lines = _lines(led)
    before = json.loads(lines[-2])
    last = json.loads(lines[-1])
    last["payload"]["text"] = "rewritten"
    lines[-1] = json.dumps(_recompute(last, before["hash"]))
    _write(led, lines)
    with pytest.raises(IntegrityError, match=r"last entry \(seq 3\) was rewritten") as info:
        led.append("after", {})
    assert "removed" not in str(info.value)
    assert _lines(led) == lines  # nothing written
    report = verify_chain(led.path)
    assert not report.ok and report.first_bad_line == 4 and "rewritten" in report.reason and "removed" not in report.reason


def test_append_refuses_a_rewritten_tail_with_a_consistent_chain(tmp_path):
    """Rewrite entries 2..5 and recompute every hash: the chain is whole, the head is not."""
    led = _ledger(tmp_path, n=6)
    lines = _lines(led)
    prev = json.loads(lines[1])["hash"]
    for i in range(2, 6):
        e = json.loads(lines[i])
        e["actor"] = "mallory"
        e = _recompute(e, prev)
        lines[i], prev = json.dumps(e), e["hash"]
    _write(led, lines)
    with pytest.raises(IntegrityError, match="rewritten"):
        led.append("after", {})
    assert not verify_chain(led.path).ok


def test_append_refuses_after_lines_were_cut_off(tmp_path):
    led = _ledger(tmp_path, n=5)
    _write(led, _lines(led)[:-2])
    with pytest.raises(IntegrityError, match="entries removed from the end: the ledger ends at seq 2, the signed head says seq 4"):
        led.append("after", {})


def test_append_refuses_a_forged_entry_added_at_the_end(tmp_path):
    led = _ledger(tmp_path, n=3)
    lines = _lines(led)
    last = json.loads(lines[-1])
    forged = _recompute({**last, "seq": 3, "event": "alias.move", "payload": {"model": "m", "alias": "champion"}}, last["hash"])
    _write(led, lines + [json.dumps(forged)])
    with pytest.raises(IntegrityError, match="added without the pipeline's key"):
        led.append("after", {})
    # a signature copied from another entry does not help either
    forged["sig"] = last["sig"]
    _write(led, lines + [json.dumps(forged)])
    with pytest.raises(IntegrityError, match="signature"):
        led.append("after", {})


def test_an_append_interrupted_before_the_head_was_written_is_continued(tmp_path):
    led = _ledger(tmp_path, n=3)
    head_before = led.head_path.read_bytes()
    led.append("interrupted", {})
    led.head_path.write_bytes(head_before)  # as if the process died between line and head
    led.append("next", {})
    report = verify_chain(led.path)
    assert report.ok and report.entries == 5


def test_append_refuses_a_deleted_ledger_whose_head_remains(tmp_path):
    led = _ledger(tmp_path, n=3)
    led.path.unlink()
    with pytest.raises(IntegrityError, match="deleted or emptied"):
        led.append("after", {})
    assert not led.path.exists()


def test_append_refuses_a_missing_head(tmp_path):
    led = _ledger(tmp_path, n=3)
    led.head_path.unlink()
    with pytest.raises(IntegrityError, match="signed head .* is missing"):
        led.append("after", {})


def test_every_entry_is_signed_and_a_bad_signature_is_named(tmp_path):
    led = _ledger(tmp_path, n=3)
    lines = _lines(led)
    assert all("sig" in json.loads(line) for line in lines)
    e = json.loads(lines[1])
    e["sig"]["sig"] = e["sig"]["sig"][:-4] + ("AAAA" if not e["sig"]["sig"].endswith("AAAA") else "BBBB")
    lines[1] = json.dumps(e)
    _write(led, lines)
    report = verify_chain(led.path)
    assert not report.ok and report.first_bad_line == 2 and "signature" in report.reason


def test_require_intact_names_a_rewritten_middle_entry(tmp_path):
    led = _ledger(tmp_path, n=5)
    lines = _lines(led)
    e = json.loads(lines[2])
    e["payload"]["text"] = "x"
    lines[2] = json.dumps(e)
    _write(led, lines)
    with pytest.raises(IntegrityError, match="line 3: payload does not match"):
        led.require_intact()
