"""Life after promotion: the pure cores the prediction service and the playbooks share.

A layer above ``stages.models`` (it loads verified models and reads the champion's signed
records) and below the stage modules and ``flows`` (it knows no web framework and no
Prefect): request checks (``inputs``), API keys and budgets (``access``), the adversarial
and out-of-distribution detector (``detector``), the extraction detector (``extraction``),
windowed input drift (``drift``), the prediction telemetry store (``store``), alert rules
(``alerts``), the verified reference data a served version is calibrated on
(``reference``), and the signed review queues of flagged inputs with the reviewers' signed
labels (``review``, ``review_labels``).
"""
