"""GET /metrics: Prometheus text (see services/metrics.py). With API keys configured it needs an admin key
(Prometheus sends one with `authorization: {credentials: <key>}` in its scrape config): it names every job."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from application.api.deps import E401, E403, admin_caller
from application.exceptions import Unavailable
from application.services.metrics import CONTENT_TYPE, shared_metrics

# A hung Redis held a scrape for the client's timeout times its retries (20 s): past Prometheus's own scrape
# timeout (10 s by default), so scrapes piled up, each holding a connection.
METRICS_TIMEOUT = 5.0

router = APIRouter(tags=["system"])


@router.get("/metrics", response_class=Response, dependencies=[Depends(admin_caller)], responses={**E401, **E403,
            200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
            operation_id="get_metrics", summary="Prometheus metrics: jobs, queue, GPUs, scheduling, HTTP")  # fmt: skip
async def get_metrics(request: Request) -> Response:
    state = request.app.state
    try:
        shared = await asyncio.wait_for(shared_metrics(state.training.store, state.training.cluster), METRICS_TIMEOUT)
    except TimeoutError:
        raise Unavailable(f"Redis did not answer within {METRICS_TIMEOUT:g} s", {"Retry-After": "5"}) from None
    # (in a thread: with several workers it reads and merges every worker's metric files)
    body = shared + await asyncio.to_thread(state.http_metrics.collect)
    return Response(body, media_type=CONTENT_TYPE)
