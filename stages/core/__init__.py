"""Core: the exception family, typed settings, where files live, telemetry switches.

Imports nothing else from the project."""
