"""Models: weights on disk (safetensors), unsafe-file scanning, model signatures,
attestations, model cards, verify-on-load, the MLflow registry (aliases, promotion and
approvals, inventory), what the ledger says of each version (registration, revocation) and
lineage.

Imports ``stages.core``, ``stages.trust``, ``stages.data`` and ``stages.ml``."""
