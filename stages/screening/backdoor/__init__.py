"""Backdoor detectors, one per file: spectral signatures with the trigger-group search,
stamped triggers, shortcuts and loss-based isolation."""
