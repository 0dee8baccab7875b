"""HTTP routes of the prediction service (FastAPI; the OpenAPI schema is at ``/openapi.json``).

Every answer is JSON with a stable ``error`` code when refused: 400 malformed JSON, 401 no or
unknown key, 403 not allowed (blocked, not an administrator), 413 body too large, 422 bad
inputs or an input the detector rejected, 429 rate limit or budget, 503 a prediction that
could not be logged. A 500 is a bug: it is answered as JSON and counted, never a traceback.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from flows.serving.page import STATUS_PAGE
from flows.serving.service import PredictionService, Refusal
from stages.data.preprocessing import unknown_category_policy


class Prediction(BaseModel):
    label: int
    confidence: float
    probabilities: list[float] | None = None


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    detail: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 422, 429, 503)}


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


async def _read_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refusal(413, "body_too_large", f"the body may hold at most {limit} bytes, the request declares {declared}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refusal(413, "body_too_large", f"the body may hold at most {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise Refusal(400, "malformed_json", f"the body is not valid JSON: {str(err).splitlines()[0][:200]}") from None
    except RecursionError:
        raise Refusal(400, "malformed_json", "the body nests arrays or objects too deeply") from None


def _table_row_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """A raw table row: an object keyed by the declared columns, or a list in their order."""
    nullable = spec.get("missing") == "impute"
    unseen = ("a category; one not seen in training is refused (422)" if unknown_category_policy(spec) == "refuse"
              else "a category; one not seen in training counts as none of them")
    cells: dict[str, Any] = {}
    for column in spec["columns"]:
        if column["type"] == "numeric":
            cell: dict[str, Any] = {"type": ["number", "null"] if nullable else "number",
                                    "description": f"in the column's own units (training range {column['low']:g} "
                                                   f"to {column['high']:g}; values beyond it are clipped)"}
        else:
            cell = {"type": ["string", "null"] if nullable else "string", "examples": list(column["categories"])[:10],
                    "description": unseen}
        cells[column["name"]] = cell
    names = list(cells)
    return {"oneOf": [
        {"type": "object", "required": names, "additionalProperties": False, "properties": cells},
        {"type": "array", "minItems": len(names), "maxItems": len(names), "prefixItems": [cells[n] for n in names],
         "items": False, "description": f"values in the column order {', '.join(names)}"}]}


def _predict_schema(max_batch: int, features: int | None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    if spec is not None:
        row: dict[str, Any] = _table_row_schema(spec)
        about = ("raw table rows in the user's units, each an object keyed by the declared column names or a list in "
                 "their order; null marks a missing cell " + ("(imputed with the training median or most frequent "
                 "category)" if spec.get("missing") == "impute" else "(refused: the model was trained with "
                 "data.missing=refuse)"))
    else:
        number = {"type": "number", "minimum": 0, "maximum": 1}
        row = {"type": "array", "items": number}
        if features:
            row.update(minItems=features, maxItems=features)
        about = "rows on the [0, 1] scale, flat (N x F); rows in the model's input shape (N x C x H x W) are accepted too"
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"], "additionalProperties": False,
        "properties": {"inputs": {"type": "array", "minItems": 1, "maxItems": max_batch, "items": row,
                                  "description": about}}}}}}}


def create_app(service: PredictionService, *, manage: bool = True) -> FastAPI:
    """The ASGI app; with ``manage`` it starts and stops the service with the app."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if manage:
            await run_in_threadpool(service.start)
        yield
        if manage:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="mlsec prediction service", version="1", lifespan=lifespan,
                  description="Predictions of the verified champion, with access control, input checks, "
                              "telemetry and attack detection.")
    sp = service.sp
    served = service.host.current
    features = int(np.prod(served.input_shape)) if served is not None else None
    spec = served.preprocessing if served is not None else None

    @app.exception_handler(Refusal)
    async def _refusal(_req: Request, err: Refusal) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": "invalid_request", "detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "detail": str(err.detail)}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_req: Request, err: Exception) -> JSONResponse:
        service.metrics.request("error")
        return JSONResponse({"error": "internal_error", "detail": f"{type(err).__name__}; see the server log"}, status_code=500)

    @app.get("/healthz", summary="Liveness and the version served")
    def healthz() -> dict[str, Any]:
        served = service.host.current
        return {"status": "ok" if served else "starting", "model": service.host.ref,
                "version": served.version if served else None}

    @app.post("/v1/predict", summary=("Predict labels for raw table rows" if spec else
                                      "Predict labels for rows on the [0, 1] scale"), response_model=None,
              responses={200: {"model": PredictResponse}, **ERRORS},
              openapi_extra=_predict_schema(sp.max_batch, features, spec))
    async def predict(request: Request) -> JSONResponse:
        client = service.authenticate(_token(request))
        body = await _read_body(request, sp.max_body_bytes)
        return JSONResponse(await run_in_threadpool(service.predict, client, body))

    @app.get("/v1/status", summary="Champion, traffic, drift, detector rates and alerts (administrators)",
             responses={401: ERRORS[401], 403: ERRORS[403]})
    def status(request: Request) -> dict[str, Any]:
        service.authenticate(_token(request), admin=True)
        return service_status(service)

    @app.post("/v1/admin/reload", summary="Check the alias now (administrators)", responses={401: ERRORS[401], 403: ERRORS[403]})
    def reload(request: Request) -> dict[str, Any]:
        service.authenticate(_token(request), admin=True)
        return service.host.check()

    @app.get("/v1/admin/predictions", summary="Logged predictions, newest first (administrators)",
             responses={401: ERRORS[401], 403: ERRORS[403]})
    def predictions(request: Request, client: str | None = Query(default=None, max_length=64),
                    since: float = Query(default=0.0, ge=0, le=1e11), limit: int = Query(default=100, ge=1, le=10_000)):
        service.authenticate(_token(request), admin=True)
        if service.store is None:
            raise Refusal(404, "telemetry_off", "telemetry is off (serving.telemetry.enabled)")
        service.flush(timeout=5)
        return {"predictions": service.store.predictions(since=since, client=client, limit=limit)}

    @app.get("/v1/admin/clients", summary="Per-client extraction state and budget use (administrators)",
             responses={401: ERRORS[401], 403: ERRORS[403]})
    def clients(request: Request) -> dict[str, Any]:
        service.authenticate(_token(request), admin=True)
        service.monitor.flush(timeout=5)
        states = service.extraction.clients() if service.extraction else {}
        return {"clients": {name: {**state, "budget_used": service.budgets.used(name)} for name, state in states.items()}}

    @app.get("/metrics", summary="Prometheus metrics (administrators)", responses={401: ERRORS[401], 403: ERRORS[403]})
    def metrics(request: Request) -> Response:
        service.authenticate(_token(request), admin=True)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/status", response_class=HTMLResponse, summary="Status page (asks for an administrator key)")
    def status_page() -> HTMLResponse:
        return HTMLResponse(STATUS_PAGE, headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                  "style-src 'unsafe-inline'; frame-ancestors 'none'",
                                                  "Cache-Control": "no-store"})

    return app


def service_status(service: PredictionService) -> dict[str, Any]:
    served = service.host.current
    store = service.store
    traffic: dict[str, Any] = {"since_start_s": round(time.time() - service.started, 1)}
    service.flush(timeout=2)
    alerts = service.sink.recent[:50]
    if store is not None:
        traffic.update(store.summary(since=time.time() - 3600))
        alerts = [{k: a[k] for k in ("time", "kind", "severity", "message")} for a in store.alerts(limit=50)]
    last = served.drift.last if served else None
    return {"champion": served.describe() if served else None, "switches": service.host.switches,
            "refused": dict(service.host.refused), "traffic": traffic,
            "drift": {"drifted": False, "tested": False} if last is None else {"tested": True, **last.to_dict()},
            "rates": service.rules.rates(),
            "flagged_clients": sorted(service.extraction.clients() and
                                      [c for c, s in service.extraction.clients().items() if s["flagged"]]
                                      if service.extraction else []),
            "telemetry": {"enabled": store is not None, "healthy": store.healthy if store else True,
                          "error": store.last_error if store and not store.healthy else None,
                          "backlog": store.backlog() if store else 0, "monitor_backlog": service.monitor.backlog(),
                          "monitor_failures": service.monitor.failures},
            "alerts": alerts}
