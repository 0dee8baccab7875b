"""The prediction service: ``mlsec serve`` (FastAPI + uvicorn).

``host``: the served model, loaded only through ``load_verified_model`` and switched when the
alias moves through the pipeline; ``service``: one prediction from key to response (limits,
checks, detectors, telemetry, alerts); ``alerting``: alerts into the ledger, the telemetry
store and Prefect events; ``app``: the HTTP routes, OpenAPI schema and status page.
"""
