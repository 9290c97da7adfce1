"""A job's output files: the listing, one file (with Range), a folder as a tar (see services/artifacts.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from application.api.deps import CallerDep, JobId, Responses, Training
from application.auth import Caller
from application.models.artifact_model import ArtifactList
from application.models.job_responses import ErrorResponse
from application.models.training_model import Job
from application.services import artifacts
from application.services.owner_slots import holding

router = APIRouter(tags=["jobs"])

_BINARY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
_TYPES = sorted({t.split(";")[0] for t in (*artifacts.MEDIA_TYPES.values(), artifacts.DEFAULT_MEDIA_TYPE)})
# A .json file goes out as application/json: its body is whatever JSON the file holds (any value), not a string.
_CONTENT: dict[str, Any] = {t: {"schema": {}} if t == "application/json" else _BINARY for t in _TYPES}
MISSING: Responses = {
    404: {"model": ErrorResponse,
          "description": "No job with this id (or not yours), or no such file or folder in its output folder "
                         "(also for any path that would lead outside it)"},
}  # fmt: skip
DOWNLOAD: Responses = {
    200: {"content": _CONTENT, "description": "the whole file, or the folder as a tar"},
    206: {"content": _CONTENT, "description": "the bytes the Range asked for (Content-Range)"},
    416: {"model": ErrorResponse, "description": "the Range starts past the end (Content-Range: bytes */size)"},
    429: {"model": ErrorResponse, "description": "DOWNLOADS_PER_OWNER downloads of this key are in progress already"},
    **MISSING,
}

ArtifactPath = Annotated[
    str,
    PathParam(max_length=4096, description="a file's `path` from the listing, or a folder's `tar` (`<folder>.tar`)"),
]
RangeHeader = Annotated[
    str | None,
    Header(alias="Range", max_length=200,
           description="one byte range: `bytes=a-b`, `bytes=a-` or `bytes=-n` (others get the whole file)"),
]  # fmt: skip
IfRangeHeader = Annotated[
    str | None,
    Header(alias="If-Range", max_length=200, description="the ETag the client has: the Range counts only while the "
           "file is unchanged (a date is a weak validator here: it gets the whole file)"),
]  # fmt: skip


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactList, responses=MISSING,
            operation_id="list_job_artifacts",
            summary="The files in the job's output folder, and the folders to download as tar")  # fmt: skip
async def list_job_artifacts(job_id: JobId, svc: Training, caller: CallerDep) -> ArtifactList:
    """Checkpoints, merged models, logging.jsonl, args.json, loss plots (images/), TensorBoard files (runs/) and
    the server's logs (logs/), each with its size, time, kind and run folder (a resume makes a new one).
    At most 5000 entries are looked at (`truncated` says so); symlinks are never followed."""
    job = await svc.require(job_id, caller)
    return await artifacts.listing(job, svc.settings.OUTPUT_ROOT)


@router.get("/jobs/{job_id}/artifacts/{path:path}", response_class=StreamingResponse, responses=DOWNLOAD,
            operation_id="download_job_artifact",
            summary="Download one file of the job's output (Range supported), or `<folder>.tar`")  # fmt: skip
async def download_job_artifact(job_id: JobId, path: ArtifactPath, svc: Training, caller: CallerDep, request: Request,
                                range_header: RangeHeader = None, if_range: IfRangeHeader = None,
                                ) -> StreamingResponse:  # fmt: skip
    """A file answers 200, or 206 for a Range (resumable downloads); `<folder>.tar` streams a checkpoint, merged
    model or run folder as an uncompressed tar, read as it is sent (a real file of that name wins)."""
    job = await svc.require(job_id, caller)
    return await download_response(request, job, caller, path, range_header, if_range)


async def download_response(request: Request, job: Job, caller: Caller, path: str, range_header: str | None,
                            if_range: str | None, headers: dict[str, str] | None = None,
                            ) -> StreamingResponse:  # fmt: skip
    """A job's file or `<folder>.tar`, streamed while it holds one of its owner's DOWNLOADS_PER_OWNER slots (429
    when none is free), given back once it is sent or could not be (the API's route, and the dashboard's)."""
    state = request.app.state
    slot = await state.download_slots.take(caller.name)
    try:
        got = await artifacts.download(job, state.settings.OUTPUT_ROOT, artifacts.as_asked(path, request.scope["path"]),
                                       range_header, if_range)  # fmt: skip
    except BaseException:
        if slot is not None:
            await slot.release()
        raise
    return StreamingResponse(holding(slot, iterate_in_threadpool(got.body), whole=True), status_code=got.status,
                             headers={**got.headers, **(headers or {})}, media_type=got.media_type)  # fmt: skip


LARGE_PAGE_BYTES = 256 << 10
PAGE_CHUNK_BYTES = 64 << 10


async def page_response(request: Request, caller: Caller, body: bytes) -> Response:
    """A JSON page; one over LARGE_PAGE_BYTES (a log page holds up to 8 MiB) is sent as it is taken, holding one of
    its owner's DOWNLOADS_PER_OWNER slots as a download does (429 when none is free). Whole pages had no cap: one
    key's 250 unread ones took the API workers from 90 MB to 1.4 GB each (hunt DN)."""
    if len(body) <= LARGE_PAGE_BYTES:
        return Response(body, media_type="application/json")
    slot = await request.app.state.download_slots.take(
        caller.name, "a log page over 256 KiB counts as one: wait for one to finish, or ask for fewer lines"
    )

    async def chunks() -> AsyncIterator[memoryview]:
        view = memoryview(body)
        for start in range(0, len(body), PAGE_CHUNK_BYTES):
            yield view[start : start + PAGE_CHUNK_BYTES]

    return StreamingResponse(holding(slot, chunks(), whole=True), media_type="application/json",
                             headers={"Content-Length": str(len(body))})  # fmt: skip


# No content: a HEAD answer never has a body, so the schema promises its statuses and headers only.
HEAD_ANSWERS: Responses = {
    200: {"description": "the file's (or tar's) headers: Content-Length (none for a tar), ETag, Last-Modified"},
    206: {"description": "the headers the Range would get (Content-Range, Content-Length)"},
    416: {"description": "the Range starts past the end (Content-Range: bytes */size)"},
    404: {"description": MISSING[404]["description"]},
}


@router.head("/jobs/{job_id}/artifacts/{path:path}", response_class=Response, responses=HEAD_ANSWERS,
             operation_id="head_job_artifact",
             summary="The headers a download of this file or `<folder>.tar` would get, without its body")  # fmt: skip
async def head_job_artifact(job_id: JobId, path: ArtifactPath, svc: Training, caller: CallerDep, request: Request,
                            range_header: RangeHeader = None, if_range: IfRangeHeader = None) -> Response:  # fmt: skip
    """What GET would answer, without its body (download tools ask first): nothing is read, no slot taken."""
    job = await svc.require(job_id, caller)
    got = await artifacts.download(job, svc.settings.OUTPUT_ROOT, artifacts.as_asked(path, request.scope["path"]),
                                   range_header, if_range, head=True)  # fmt: skip
    response = Response(status_code=got.status, headers=got.headers, media_type=got.media_type)
    if "Content-Length" not in got.headers:  # a tar is streamed with no length: not 0, which Response would add
        del response.headers["content-length"]
    return response
