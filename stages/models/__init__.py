"""Models: weights on disk (safetensors), unsafe-file scanning, model signatures,
attestations, model cards, verify-on-load, the MLflow registry (aliases, promotion,
inventory) and lineage.

Imports ``stages.core``, ``stages.trust``, ``stages.data`` and ``stages.ml``."""
