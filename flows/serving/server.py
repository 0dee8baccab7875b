"""``mlsec serve``: verify and load the champion, then serve it with uvicorn until interrupted.

The model is verified before the port is bound: a version that does not verify, or an alias
moved outside the pipeline, stops the command with exit code 4 and nothing listening.
"""

from __future__ import annotations

from typing import Any

from stages.core.errors import InvalidInput
from stages.core.params import Params
from stages.core.workspace import Workspace


def serve(ws: Workspace, params: Params, *, ref: str | None, host: str | None, port: int | None,
          on_ready: Any = None) -> None:
    import uvicorn  # the web stack: only 'serve' needs it
    from threadpoolctl import threadpool_limits

    from flows.serving.app import create_app
    from flows.serving.service import PredictionService

    host = host or params.serving.host
    port = params.serving.port if port is None else port
    if not (0 <= port <= 65535):
        raise InvalidInput(f"--port must lie in 0..65535, got {port}")
    # the monitor's NumPy products are small (a request's rows against one client's class sets),
    # and OpenBLAS's other threads only spin beside the requests: measured with 32-row requests
    # on 2 cores, the server's CPU fell from 7.45 to 4.97 ms a request. The network keeps its own
    # (torch) threads, set where the model is loaded.
    threadpool_limits(1, user_api="blas")
    service = PredictionService(ws, params, ref=ref)
    service.start()                       # raises before anything listens
    app = create_app(service, manage=False)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            limit_concurrency=256, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    served = service.host.current
    print(f"serving {service.host.ref} (version {served.version}) on http://{host}:{port}  "
          f"status page /status, OpenAPI /docs; drift reference: {served.reference['statistics_source']}", flush=True)
    try:
        server.run()
    finally:
        service.stop()
