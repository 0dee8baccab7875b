"""Running the suites on one ephemeral Great Expectations context, and the Data Docs."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from stages.data.expectations.checks import _Check

_PARTIAL = 10  # how many unexpected values the trimmed raw results keep


def _import_gx() -> Any:
    """Import great_expectations with telemetry off (the import is slow: about 3 s)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import great_expectations as gx  # Great Expectations: about 4 s to import; telemetry off first

    return gx


def _context(gx: Any, docs_dir: Path | None) -> Any:
    """An ephemeral (in-memory) context, progress bars off, a local Data Docs site if asked."""
    from great_expectations.data_context.types.base import (  # Great Expectations: about 4 s to import; telemetry off first
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                               progress_bars=ProgressBarsConfig(globally=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    if docs_dir is not None:
        context.add_data_docs_site(site_name="mlsec", site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
        })
    return context


def _trim(value: Any) -> Any:
    """Keep the raw GX result JSON-able and small: cap long lists, drop tracebacks."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in ("unexpected_list", "unexpected_index_list", "unexpected_index_query",
                       "exception_traceback", "partial_unexpected_counts"):
                continue
            out[key] = _trim(item)
        return out
    if isinstance(value, list):
        if len(value) > 2 * _PARTIAL:
            return [_trim(v) for v in value[:_PARTIAL]] + [f"... ({len(value)} items)"]
        return [_trim(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _exception_message(result: Any) -> str | None:
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for sub in info.values():  # one entry per metric that failed
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return str(sub.get("exception_message"))
    return None


def _run_suites(checks: list[_Check], frames: dict[str, pd.DataFrame], docs_dir: Path | None
                ) -> tuple[list[dict[str, Any]], int, dict[str, Any], Path | None]:
    """Run every suite; return (failures, evaluated, trimmed raw results, docs index)."""
    gx = _import_gx()
    context = _context(gx, docs_dir)
    source = context.data_sources.add_pandas("mlsec")
    failures: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"suites": {}}
    evaluated = 0
    for suite_name in dict.fromkeys(c.suite for c in checks):
        suite_checks = [c for c in checks if c.suite == suite_name]
        asset = source.add_dataframe_asset(suite_name)
        batch = asset.add_batch_definition_whole_dataframe(suite_name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"mlsec.{suite_name}"))
        by_id: dict[str, _Check] = {}
        for check in suite_checks:
            check.expectation.meta = {"check": check.name, "expected": check.expected}
            added = suite.add_expectation(check.expectation)
            by_id[str(added.id)] = check
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"mlsec.{suite_name}", data=batch, suite=suite))
        result_format: dict[str, Any] = {"result_format": "COMPLETE" if suite_name != "rows" else "SUMMARY"}
        if suite_name in ("features", "classes"):
            result_format["unexpected_index_column_names"] = ["feature" if suite_name == "features" else "class"]
        run = definition.run(batch_parameters={"dataframe": frames[suite_name]}, result_format=result_format)
        raw["suites"][suite_name] = _trim(run.to_json_dict())
        seen: set[str] = set()
        for result in run.results:
            config = result.expectation_config
            check = by_id.get(str(config.id)) if config is not None else None
            name = check.name if check else (config.type if config is not None else "unknown expectation")
            if check is not None:
                seen.add(str(config.id))
            evaluated += 1
            error = _exception_message(result)
            if result.success and error is None:
                continue
            if error is not None:
                column = config.kwargs.get("column") if config is not None else None
                observed = f"could not be evaluated: {error}"
            else:
                try:
                    column, observed = check.describe(result.result) if check else (None, str(result.result))
                except Exception as err:  # a description bug must not hide the failure
                    column, observed = None, f"failed ({type(err).__name__} while describing: {err})"
            failures.append({"check": name, "expectation": config.type if config is not None else None,
                             "column": column, "observed": observed,
                             "expected": check.expected if check else ""})
        for check_id, check in by_id.items():
            if check_id not in seen:  # fail closed: an expectation without a result failed
                evaluated += 1
                failures.append({"check": check.name, "expectation": type(check.expectation).__name__,
                                 "column": None, "observed": "no result returned by Great Expectations",
                                 "expected": check.expected})
    docs_path = None
    if docs_dir is not None:
        context.build_data_docs(site_names=["mlsec"])
        docs_path = Path(docs_dir).resolve() / "index.html"
        if not docs_path.is_file():
            raise RuntimeError(f"Data Docs were built but {docs_path} is missing")
    return failures, evaluated, raw, docs_path


def _summary(failures: list[dict[str, Any]], evaluated: int) -> str:
    if not failures:
        return f"all {evaluated} expectations passed"
    listed = "; ".join(f"{f['check']} ({f['observed']})" for f in failures)
    return f"{len(failures)} of {evaluated} expectations failed: {listed}"


def _plain_error_page(docs_dir: Path, failures: list[dict[str, Any]]) -> Path | None:
    """When GX cannot render, leave a plain HTML page so the failure is still inspectable."""
    try:
        docs_dir.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"<tr><td>{html.escape(str(f['check']))}</td><td>{html.escape(str(f['observed']))}</td>"
                       f"<td>{html.escape(str(f['expected']))}</td></tr>" for f in failures)
        path = docs_dir / "index.html"
        path.write_text("<!doctype html><title>mlsec validation failed</title><h1>Validation failed</h1>"
                        f"<table><tr><th>check</th><th>observed</th><th>expected</th></tr>{rows}</table>")
        return path
    except OSError:
        return None
