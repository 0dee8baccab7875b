"""Model card (Markdown and HTML) for a registered version: intended use, data and digests,
metrics, robustness curve, privacy guarantee, quarantine summary, known limits, lineage."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

from stages.core.params import Params
from stages.trust.context import RunContext

# an empty project.purpose or intended_use (a new workspace's params.yaml leaves them to the owner)
NOT_STATED = "Not stated: the owner has not written project.purpose and project.intended_use in params.yaml."


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def render_markdown(params: Params, *, run_id: str, manifest: dict[str, Any], verdict: dict[str, Any],
                    evaluation: dict[str, Any], screen: dict[str, Any]) -> str:
    p = params.project
    m = evaluation["metrics"]
    train, ev = params.train.for_kind(manifest.get("kind")), params.evaluate.for_kind(manifest.get("kind"))
    robustness = evaluation.get("robustness", {})
    labels = {"fgsm": "FGSM", "pgd": f"PGD-{ev.pgd_steps}×{ev.restarts}", "apgd_ce": f"APGD-CE-{ev.apgd_steps}",
              "apgd_dlr": f"APGD-DLR-{ev.apgd_steps}", "apgd_t": f"APGD-T-{ev.apgd_steps}"}
    attacks = robustness.get("attacks", ["fgsm", "pgd"])
    attacked = robustness.get("n_attacked", evaluation.get("n_test"))
    eps_rows = []
    at = robustness.get("attacks_at", {})  # the curve's points may run fewer attacks
    for eps in ev.epsilons:
        key = f"{eps:g}"
        parts = [f"{labels.get(a, a)} {m.get(f'{a}_accuracy_eps_{key}', float('nan')):.4f}"
                 for a in at.get(str(float(eps)), attacks)]
        parts.append(f"worst case per row {m.get(f'robust_accuracy_eps_{key}', float('nan')):.4f}")
        curve_point = set(at.get(str(float(eps)), attacks)) != set(attacks)
        eps_rows.append((f"ε = {key} ({attacked} rows attacked{'; a curve point, fewer attacks' if curve_point else ''})",
                         " · ".join(parts)))
    privacy = evaluation.get("privacy")
    if privacy:
        rows = [("dp.epsilon_spent", f"{privacy['epsilon_spent']:.4f}"), ("dp.delta", f"{privacy['delta']:g}"),
                ("dp.noise_multiplier", f"{privacy['noise_multiplier']!r}"), ("dp.sample_rate", f"{privacy['sample_rate']!r}"),
                ("dp.steps", str(privacy["steps"])), ("dp.accountant", str(privacy["accountant"])),
                ("dp.max_grad_norm", str(privacy["max_grad_norm"])), ("dp.poisson_sampling", str(privacy["poisson_sampling"]))]
        privacy_text = ("DP-SGD (Opacus), per-sample clipping and Gaussian noise. The accountant's inputs are MLflow params of "
                        "this version's run (`dp.*`); `stages.ml.dp_audit.recompute_epsilon(run.data.params)` recomputes ε "
                        "from them with Opacus' accountant.\n\n" + _table(rows, ("privacy", "value")))
    else:
        privacy_text = "No formal differential-privacy guarantee (trained without DP-SGD)."
    mia = evaluation.get("membership_inference")
    mia_text = (f"Empirical membership-inference audit ({mia.get('attack', 'loss threshold')}): AUC {mia['auc']:.3f}, "
                f"TPR at 1% FPR {mia['tpr_at_1pct_fpr']:.3f}." if mia else "Membership-inference audit not run.")
    findings = screen.get("findings", {})
    per_det = findings.get("per_detector", {})
    qrows = [(name, str(info.get("count", info.get("flagged", "")))) for name, info in per_det.items()]
    classes = list(manifest.get("classes") or range(int(manifest["num_classes"])))

    def name(position: Any) -> Any:
        return classes[int(position)] if isinstance(position, int) and 0 <= position < len(classes) else position

    notes = [f"- Class {name(c['class'])} was largely relabelled as {name(c['absorbed_by'])} (targeted flip): the relabelled rows are quarantined."
             for c in per_det.get("label_issues", {}).get("lost_classes", [])]
    notes += [f"- Annotator {a} scored below the quality bar; their labels were left out of the consensus."
              for a in per_det.get("annotators", {}).get("flagged_annotators", [])]
    checks = [(c["name"], f"{'pass' if c['passed'] else 'FAIL'}: {c['reason']}") for c in verdict["checks"]]
    limits = "\n".join(f"- {item}" for item in p.known_limits) or "- None recorded."
    return f"""# Model card: {p.name}

## Intended use
{p.intended_use or p.purpose or NOT_STATED}

- Owner: {p.owner}
- Purpose: {p.purpose or "not stated"}
- Risk class: {p.risk_class}
- Training mode: {train.mode}, model {train.model} ({'method ' + train.adversarial.method + ', ε ' + format(train.adversarial.epsilon, 'g') if train.mode == 'adversarial' else 'the default for this kind of data' if manifest.get('kind') == 'table' else ''})
{_inputs_text(manifest, classes, params.data.unknown_category)}

## Data
- Source: `{manifest['source']}`
- Rows: {manifest['n']} (held-out test rows evaluated: {evaluation['n_test']}; accepted training rows: {screen.get('accepted')})
- Data SHA-256 (Merkle root over prepared files): `{manifest['merkle_root']}`
- DVC hash: `{manifest['dvc']['md5']}`
- Accepted training set digest: `{screen.get('accepted_sha256')}`

## Metrics (held-out split; {_epsilon_text(manifest)})
{_table([("clean accuracy", f"{m['clean_accuracy']:.4f}")] + eps_rows, ("metric", "value"))}

![robust accuracy vs epsilon](robustness_curve.png)

## Privacy
{privacy_text}

{mia_text}

## Data screening (quarantine)
{screen.get('flagged', 0)} of {screen.get('n_screened', screen.get('n_train', '?'))} rows quarantined ({100 * float(screen.get('flagged_fraction', 0)):.2f}%; {screen.get('flagged_test', 0)} of them held-out test rows, left out of the evaluation); list: `{screen.get('quarantine')}`.

{_table(qrows, ("detector", "flagged")) if qrows else ''}
{chr(10).join(notes)}

## Gate verdict: {verdict['verdict']}
{_table(checks, ("check", "result"))}

## Policy
{policy_text(verdict)}

## Known limits
{limits}

## Lineage
- Run: `{run_id}`; code commit `{manifest['git']['commit']}`{' (uncommitted changes)' if manifest['git']['dirty'] else ''}
- Params SHA-256: `{manifest['params_sha256']}`; environment lock SHA-256: `{manifest['environment_lock_sha256']}`
- Weights SHA-256: `{verdict['weights_sha256']}`
- Verify with: `mlsec lineage {p.name}/<version> --verify`
"""


def policy_text(verdict: dict[str, Any]) -> str:
    """The card's policy paragraph: the signed policy, and "policy overridden" with each difference."""
    p = verdict.get("policy") or {}
    if not p.get("signed_sha256"):
        return "The verdict records no signed policy."
    head = (f"Signed policy `{p['signed_sha256'][:16]}...` (policy owner key `{str(p.get('signed_by'))[:16]}`, "
            f"{'trusted on first use' if p.get('trust') == 'first-use' else 'signed by the policy owner'}).")
    if not p.get("overridden"):
        return head + " This run used it unchanged."
    rows = [(d["setting"], f"signed {d['signed']!r}, this run {d['effective']!r}{' (weaker)' if d['weaker'] else ''}")
            for d in p.get("differences", [])]
    under = ("would also have passed" if p.get("signed_policy_passed")
             else f"would have failed ({', '.join(p.get('signed_policy_failed') or [])})")
    tail = ("It is never promoted automatically: it needs signed approvals as in manual mode."
            if p.get("weakened") else "No setting is weaker than the signed policy.")
    return (f"{head}\n\n**Policy overridden**: this run's settings differ from the signed policy. Under the signed "
            f"policy the model {under}. {tail}\n\n{_table(rows, ('setting', 'difference'))}")


def _inputs_text(manifest: dict[str, Any], classes: list[Any], unknown_category: str) -> str:
    """What a caller sends and gets back, with the column names of a table and what becomes of
    a category no training row held (``data.unknown_category``, which train signs into the
    preprocessing and which is part of its cache key, so it is this run's model's policy)."""
    classes_text = ", ".join(f"`{c}`" for c in classes)
    out = f"- Output: logits over {len(classes)} classes, in order: {classes_text}."
    columns = manifest.get("columns")
    if manifest.get("kind") == "table" and columns:
        listed = ", ".join(f"`{c['name']}` ({c['type']}{', ' + str(len(c['categories'])) + ' categories' if c['type'] == 'categorical' else ''})"
                           for c in columns)
        unseen = ""
        if any(c["type"] == "categorical" for c in columns):
            unseen = (" A category no training row held is refused, naming the row, column and value"
                      if unknown_category == "refuse" else
                      " A category no training row held is scored as none of its column's categories (all indicators zero)")
            unseen += f" (`data.unknown_category: {unknown_category}`)."
        return (f"- Input: table rows with {len(columns)} named columns in the user's units: {listed}. The signed "
                f"preprocessing (fitted on the accepted training rows; missing cells: {manifest.get('missing', 'refuse')}) "
                f"scales them onto [0, 1] before the network.{unseen}\n{out}")
    shape = manifest["input_shape"]
    return (f"- Input: images of shape {shape} (channels x height x width), float32 on [0, 1] or uint8 pixels "
            f"(layout at ingest: {manifest.get('layout', 'NCHW')}).\n{out}")


def _epsilon_text(manifest: dict[str, Any]) -> str:
    if manifest.get("kind") == "table":
        return "ε on the scaled features: a fraction of each numeric column's training range"
    return "ε on the [0, 1] input scale"


def write_model_card(ctx: RunContext, params: Params, *, manifest: dict[str, Any], verdict: dict[str, Any],
                     evaluation: dict[str, Any], screen: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:

    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_markdown(params, run_id=ctx.run_id, manifest=manifest, verdict=verdict, evaluation=evaluation, screen=screen)
    md = out_dir / "model_card.md"
    md.write_text(text)
    curve = ctx.run_dir / "evaluation" / "robustness_curve.png"
    if curve.exists():
        shutil.copy2(curve, out_dir / "robustness_curve.png")
    body = []
    for line in text.splitlines():
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            body.append('<img src="robustness_curve.png" alt="robust accuracy vs epsilon" width="480">')
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Model card</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{border:1px solid #ccc;padding:.2em .5em}"
            "table{border-collapse:collapse}</style></head><body>" + "\n".join(body).replace("</td></tr>\n<tr>", "</td></tr><tr>")
            + "</body></html>")
    page = page.replace("<tr>", "<table><tr>", 1) if "<tr>" in page else page
    out = out_dir / "model_card.html"
    out.write_text(_wrap_tables(page))
    return md, out


def _wrap_tables(page: str) -> str:
    """Group consecutive table rows into tables."""
    page = page.replace("<table><tr>", "<tr>")
    return re.sub(r"((?:<tr>.*?</tr>\n?)+)", lambda m: f"<table>{m.group(1)}</table>", page)
