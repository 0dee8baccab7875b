"""Screening: label integrity, poisoning and backdoor detection.

``screen_dataset`` (``core.py``) runs the detectors named in ``params.detectors`` (the name-keyed registry
``DETECTORS``, ``registry.py``) on one dataset and returns ``ScreenFindings``: the labels to train with,
one entry per flagged row with the detectors that flagged it and why, and a per-detector
summary. It is a pure core: no file I/O (``plot_suspects`` is the one exception and only
writes the PNG it is asked for).

Inputs everywhere: ``X`` float32 on the [0, 1] scale, N x C x H x W images or N x F rows;
``y`` int labels in 0..K-1; optional ``annotator_labels`` N x A ints with -1 = no label.

Fail closed: a detector that raises makes ``screen_dataset`` raise ``PipelineError``;
nothing is skipped silently. Unknown detector names raise ``InvalidInput``.

Detectors (names as in ``params.yaml``), one module each:

    labels.py                  label_issues: labels the out-of-sample models all but rule out, lost classes
    datalab.py                 outliers, near_duplicates: one cleanlab Datalab kNN audit
    annotators.py              annotators: CROWDLAB consensus of the trusted annotators
    backdoor/spectral.py       spectral: spectral signatures on cross-class residuals
    backdoor/trigger_groups.py   ... and the trigger-group search for ~1% backdoors
    backdoor/stamps.py         stamps: triggers stamped on the background or on ink
    backdoor/shortcuts.py      shortcuts: labels that hold only while doubted rows are trained on
    backdoor/loss.py           loss_isolation: rows learned abnormally fast

Tables (N x F) are screened like images, on standardised columns wherever rows are compared
(neighbours, outliers, the table models: logistic regression, an RBF SVC, nearest neighbours);
a categorical column's one-hot block weighs as one column (``evidence.table_features``).

Shared evidence: ``evidence.py`` (out-of-sample probabilities, the screening network),
``neighbours.py`` (cross-class and trimmed nearest rows, the Datalab audit), ``context.py``
(inputs, and the one recipe of each piece of shared evidence and its cache).
"""

from stages.screening.core import screen_dataset
from stages.screening.plots import plot_suspects
from stages.screening.registry import DETECTORS, register_detector
from stages.screening.results import DetectorResult, ScreenFindings

__all__ = ["DETECTORS", "DetectorResult", "ScreenFindings", "plot_suspects", "register_detector", "screen_dataset"]
