"""The data validation core: a Great Expectations 1.x suite over a dataset's arrays.

``validate_arrays`` checks one dataset (``X`` float32 on the [0, 1] scale, ``y`` int64
labels) and returns a :class:`ValidationReport`; ``dataset_statistics`` gives the
statistics that are saved as the reference for the next run's drift checks.

How the data reaches Great Expectations
---------------------------------------
Row-level expectations on every feature column would cost one expectation per column
(784 for MNIST) over every row: tens of seconds for 60,000 x 784. So the suite runs on
four pandas frames, each validated by its own expectation suite on one ephemeral context:

``rows``      the samples themselves: ``f0..f{K-1}`` (features flattened in C order) plus
              ``label``. Schema (ordered columns, row count) and the label checks (int64,
              no missing value, within ``0..num_classes-1``) run row by row here.
``features``  one row per feature with aggregates computed in numpy in one pass:
              dtype, min, max (ignoring NaN, so infinities show), NaN count, inf count,
              mean and std (over finite values), and with a reference the absolute shift of
              mean and std. Range, NaN/inf and drift expectations run on this frame.
              GX treats NaN as null and skips nulls in range checks, so NaN and inf are
              counted explicitly and every aggregate is also expected to be non-null.
``classes``   one row per class: count, fraction and, with a reference, fraction shift.
``dataset``   one row: the duplicate-row fraction (rows whose feature bytes repeat an
              earlier row, found by a BLAKE2b hash of each row; the label is not hashed,
              so one image under two labels counts as a duplicate).

Any expectation that raises, a missing result, or GX itself failing makes the report a
failure: the validation fails closed.

Cost (2 cores): importing GX about 3 s once per process; then digits (1,797 x 64) about
0.3 s per call, random MNIST-sized data (60,000 x 784) about 2 to 2.5 s, of which about
1 s is GX fingerprinting the ``rows`` frame (``pd.util.hash_pandas_object``, always done
by GX for in-memory frames), 0.4 s the row hashing and 0.3 s the per-feature aggregates.

Data Docs: with ``docs_dir`` an in-memory context gets a local site on the file system and
GX's own site builder writes ``index.html``, one page per suite run and ``static/``. The
pages load Bootstrap and jQuery from public CDNs when opened; offline they show unstyled
but complete. Every run rebuilds the index from this run's results only.

    statistics.py  numpy aggregates, duplicate rows, class counts, dataset statistics
    frames.py      the four frames the suites run on
    checks.py      the expectations and how each failure is described
    gx.py          running the suites on one ephemeral GX context; Data Docs
    validation.py  ``validate_arrays``: the fail-closed verdict
"""

from stages.data.expectations.statistics import dataset_statistics
from stages.data.expectations.validation import ValidationReport, validate_arrays

__all__ = ["ValidationReport", "dataset_statistics", "validate_arrays"]
