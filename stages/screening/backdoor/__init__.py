"""Backdoor detectors, one per file: spectral signatures with the trigger-group search,
stamped triggers, activation clustering and loss-based isolation."""
