from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.errors import InvalidInput
from stages.core.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_and_digest_is_stable():
    a = load_params(ROOT / "params.yaml")
    b = load_params(ROOT / "params.yaml")
    assert a.digest() == b.digest()
    assert a.train.mode in ("standard", "adversarial", "dp")
    with pytest.raises(Exception):
        a.train.epochs = 3  # frozen


def test_override_applies_and_changes_the_digest():
    base = load_params(ROOT / "params.yaml")
    changed = load_params(ROOT / "params.yaml", ["train.epochs=3", "gate.min_robust_accuracy={0.05: 0.1}"])
    assert changed.train.epochs == 3 and changed.gate.min_robust_accuracy == {0.05: 0.1}
    assert changed.digest() != base.digest()


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown setting 'train.epoch'"),
    ("nosection.x=1", "unknown setting 'nosection'"),
    ("train.epochs=abc", "train.epochs"),
    ("train.mode=magic", "train.mode"),
    ("evaluate.epsilon=0.5", "must be one of evaluate.epsilons"),
    ("evaluate.curve_attacks=[]", "evaluate.curve_attacks"),
    ("train.epochs", "key=value"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(InvalidInput, match=message) as info:
        load_params(ROOT / "params.yaml", [override])
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_is_rejected(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  epochs:", "  epochz: 1\n  epochs:")
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(InvalidInput, match="unknown setting"):
        load_params(tmp_path / "p.yaml")


def test_dp_needs_exactly_one_of_epsilon_or_noise():
    with pytest.raises(InvalidInput, match="exactly one"):
        load_params(ROOT / "params.yaml", ["train.dp.noise_multiplier=1.0"])


def test_tables_get_their_own_defaults_and_images_the_section_as_written():
    p = load_params(ROOT / "params.yaml")
    assert p.train.for_kind("image") == p.train and p.train.for_kind(None) == p.train
    table = p.train.for_kind("table")
    assert table.mode == "standard" and table.model == "mlp" and table.table == {}
    assert table.adversarial == p.train.adversarial  # nested sections merge key by key
    ev = p.evaluate.for_kind("table")
    assert ev.epsilon in ev.epsilons and ev.epsilon < p.evaluate.epsilon
    gate = p.gate.for_kind("table")
    assert set(gate.min_robust_accuracy) <= set(ev.epsilons)  # the gated epsilon is measured
    assert gate.min_clean_accuracy == p.gate.min_clean_accuracy


def test_table_keys_win_for_tables():
    images = load_params(ROOT / "params.yaml", ["train.mode=dp", "train.epochs=3"])
    assert images.train.mode == "dp" and images.train.for_kind("table").mode == "standard"
    assert images.train.for_kind("table").epochs == 100  # named by the overlay
    assert images.train.for_kind("table").batch_size == images.train.batch_size  # not named: the section's own
    tables = load_params(ROOT / "params.yaml", ["train.table.mode=dp"])
    assert tables.train.mode == "adversarial" and tables.train.for_kind("table").mode == "dp"
    added = load_params(ROOT / "params.yaml", ["train.table.batch_size=16", "train.table.adversarial.epsilon=0.03"])
    assert added.train.for_kind("table").batch_size == 16 and added.train.batch_size == 64
    assert added.train.for_kind("table").adversarial.epsilon == 0.03
    with pytest.raises(InvalidInput, match="under 'table'"):
        load_params(ROOT / "params.yaml", ["train.table.batch_sise=16"])
    nested = load_params(ROOT / "params.yaml", ["train.table={adversarial: {epsilon: 0.02}}"])
    assert nested.train.for_kind("table").adversarial.epsilon == 0.02
    assert nested.train.for_kind("table").adversarial.method == nested.train.adversarial.method


@pytest.mark.parametrize("override, message", [
    ("train.table={epochz: 3}", r"unknown setting\(s\) \['epochz'\] under 'table'"),
    ("evaluate.table={epsilon: 0.5}", "must be one of evaluate.epsilons"),
    ("train.table={mode: magic}", "train"),
    ("data.classes=[no, yes]", "YAML reads yes/no/on/off as booleans; quote the class names"),
    ("data.image_shape=[3, 8, 8, 8]", r"must be \[H, W\] or \[C, H, W\]"),
])
def test_bad_table_defaults_fail_at_load(override, message):
    with pytest.raises(InvalidInput, match=message):
        load_params(ROOT / "params.yaml", [override])


def test_every_attack_runs_where_the_gate_or_the_headline_decides():
    """The evaluate stage runs every attack at the headline epsilon and at each epsilon the
    gate judges, per kind of data; the rest of the curve runs evaluate.curve_attacks."""
    from stages.evaluate import full_strength_epsilons

    p = load_params(ROOT / "params.yaml")
    assert p.evaluate.curve_attacks == ["fgsm", "pgd"] and p.evaluate.epsilons == [0.03, 0.05, 0.1]
    assert full_strength_epsilons(p, "image") == [0.1] and full_strength_epsilons(p, "table") == [0.02]
    gated = load_params(ROOT / "params.yaml", ["gate.min_robust_accuracy={0.03: 0.8, 0.1: 0.5}"])
    assert full_strength_epsilons(gated, "image") == [0.03, 0.1]


def test_the_curve_runs_the_chosen_attacks_among_those_run():
    """An attack left out of evaluate.attacks never runs on the curve; a curve left with none
    of its attacks runs those that are run, and a null curve_attacks runs every one."""
    from stages.evaluate import curve_attacks

    assert curve_attacks(["fgsm", "pgd"], ["fgsm", "pgd", "apgd_ce"]) == ["fgsm", "pgd"]
    assert curve_attacks(["fgsm", "pgd"], ["fgsm"]) == ["fgsm"]
    assert curve_attacks(["pgd"], ["fgsm", "apgd_t"]) == ["fgsm", "apgd_t"]
    assert curve_attacks(None, ["fgsm", "pgd"]) is None
