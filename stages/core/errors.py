"""The pipeline's exception family; the command line maps each class to an exit code.

Exit codes (documented in README.md):
    0  done (and promoted where asked)
    1  anything else (PipelineError)
    2  bad input or usage (InvalidInput)
    3  gate rejected, poisoning suspected, promotion refused (GateRejected)
    4  integrity or security violation (IntegrityError)
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: an expected failure with a one-line message for the user."""

    exit_code = 1


class InvalidInput(PipelineError):
    """Bad data, bad parameters or bad usage. Nothing stored was changed."""

    exit_code = 2


class ValidationFailed(InvalidInput):
    """The data failed its Great Expectations suite."""


class GateRejected(PipelineError):
    """A security decision said no: gate, screening or promotion policy."""

    exit_code = 3


class PoisoningSuspected(GateRejected):
    """Screening flagged more samples than policy allows."""


class IntegrityError(PipelineError):
    """Bytes, signatures or the audit trail do not match what was recorded."""

    exit_code = 4


class SecurityError(IntegrityError):
    """Unsafe content (pickle opcodes, path escapes, unknown signers)."""


class ModelRevoked(IntegrityError):
    """A model version that ``mlsec revoke`` withdrew: loading and promotion refuse it."""
