"""Trust: canonical JSON, hashing and Merkle roots, keys and signatures, the hash-chained
ledger, provenance (git, environment, DVC), signed verdicts and the run context that
re-verifies every input before a stage reads it.

Imports only ``stages.core``."""
