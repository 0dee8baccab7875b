"""The pipeline's code, in layers that import only downward.

    stages/ingest validate screen train evaluate gate register   the seven stage modules
    stages/runner.py                                            how a stage runs (ledger, exit codes)
    stages/models/      model files: safety, signing, attestation, card, registry, lineage
    stages/screening/   label and poisoning detectors, the quarantine evidence
    stages/ml/          nets, attacks, training (adversarial, DP), robustness and privacy audits
    stages/data/        readers, prepared form, Great Expectations suite, drift reference
    stages/trust/       hashing, keys, signatures, ledger, provenance, verdicts, run context
    stages/core/        errors, params, workspace, telemetry

``tests/test_architecture.py`` keeps the order: core <- trust <- data <- ml <- screening <-
models <- stage modules <- flows.
"""
