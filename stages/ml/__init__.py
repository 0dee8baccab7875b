"""Machine learning: nets, evasion attacks, training (standard, adversarial, DP-SGD),
robustness evaluation and the membership-inference audit.

Imports ``stages.core`` (and nothing that touches files or services)."""
