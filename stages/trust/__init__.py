"""Trust: canonical JSON, hashing and Merkle roots, keys and signatures, the hash-chained
ledger, provenance (git, environment, DVC), signed verdicts, the run context that
re-verifies every input before a stage reads it, people's keys (approvers, the policy
owner), the signed policy and signed approvals.

Imports only ``stages.core``."""
