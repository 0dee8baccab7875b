"""Data: source readers and the normal form, the prepared on-disk form, the Great
Expectations suite and the signed drift reference.

Imports ``stages.core`` and ``stages.trust``."""
