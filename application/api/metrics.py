"""GET /metrics: Prometheus text (see services/metrics.py). With API keys configured it needs an admin key
(Prometheus sends one with `authorization: {credentials: <key>}` in its scrape config): it names every job."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from application.api.deps import E401, E403, admin_caller
from application.services.metrics import CONTENT_TYPE, shared_metrics

router = APIRouter(tags=["system"])


@router.get("/metrics", response_class=Response, dependencies=[Depends(admin_caller)], responses={**E401, **E403,
            200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
            operation_id="get_metrics", summary="Prometheus metrics: jobs, queue, GPUs, scheduling, HTTP")  # fmt: skip
async def get_metrics(request: Request) -> Response:
    state = request.app.state
    body = await shared_metrics(state.training.store, state.training.cluster) + state.http_metrics.collect()
    return Response(body, media_type=CONTENT_TYPE)
