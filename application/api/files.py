"""Uploaded data sets (services/files.py): upload, list, read and delete; a job names one by its id."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status

from application.api.deps import E400, CallerDep, Responses
from application.models.file_model import FILE_ID_HELP, FILE_ID_PATTERN, PURPOSES, FileList, FileObject
from application.models.job_responses import ErrorResponse
from application.services.files import SUFFIXES, FileStore
from application.services.index_pages import CURSOR_HELP, CURSOR_PATTERN

router = APIRouter(tags=["files"])


async def _files(request: Request) -> FileStore:
    return request.app.state.files


FilesDep = Annotated[FileStore, Depends(_files)]
FileId = Annotated[str, Path(pattern=FILE_ID_PATTERN, max_length=29, description=FILE_ID_HELP)]

E404: Responses = {404: {"model": ErrorResponse, "description": "No file with this id (or not yours)"}}
UPLOAD_ERRORS: Responses = {
    **E400,
    413: {"model": ErrorResponse, "description": "The file is larger than FILE_MAX_BYTES"},
    408: {"model": ErrorResponse, "description": "Nothing of the body came for UPLOAD_IDLE_SECONDS: send it again"},
    415: {"model": ErrorResponse, "description": "The body is not multipart/form-data"},
    429: {"model": ErrorResponse, "description": "UPLOADS_PER_OWNER uploads of this key are in progress already"},
    507: {"model": ErrorResponse, "description": "The server could not store the file (disk full, read-only root)"},
}
# The body is read as a stream (services/upload_stream.py), not by FastAPI, so it is described here by hand.
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": f"the data set; its name must end in {', '.join(SUFFIXES)}"},
                        "purpose": {"type": "string", "enum": list(PURPOSES), "default": "sft",
                                    "description": "rlhf: each row needs a rejected answer (rejected_response), a "
                                                   "label (KTO) or a prompt alone (GRPO/PPO)"},
                    },
                }
            }
        },
    }
}  # fmt: skip


@router.post("/files", status_code=status.HTTP_201_CREATED, response_model=FileObject, responses=UPLOAD_ERRORS,
             openapi_extra=UPLOAD_BODY,
             summary="Upload a data set (.jsonl, .json or .csv) as multipart/form-data")  # fmt: skip
async def upload_file(request: Request, files: FilesDep, caller: CallerDep) -> FileObject:
    """Streamed to disk and checked like a job's local data set (its rows must be a format ms-swift trains on);
    a file that fails the check is not kept (422). Use its `id` as a job's `data_path`.

    `curl -F file=@train.jsonl -F purpose=sft -H 'Authorization: Bearer <key>' .../training/files`"""
    return await files.upload(request.stream(), request.headers.get("content-type"),
                              request.headers.get("content-length"), caller)  # fmt: skip


@router.get("/files", response_model=FileList, summary="List uploaded files, newest first")
async def list_files(
    files: FilesDep,
    caller: CallerDep,
    owner: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                       description="one owner's; a user key sees its own (another's: none)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN, description=CURSOR_HELP)] = None,
) -> FileList:  # fmt: skip
    return await files.list_files(caller, owner, offset, limit, cursor)


@router.get("/files/{file_id}", response_model=FileObject, responses=E404, summary="One uploaded file")
async def get_file(file_id: FileId, files: FilesDep, caller: CallerDep) -> FileObject:
    return await files.get(file_id, caller)


@router.delete("/files/{file_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={**E404, 409: {"model": ErrorResponse, "description": "An active job uses the file"}},
               summary="Delete an uploaded file (refused while an unfinished job uses it)")  # fmt: skip
async def delete_file(file_id: FileId, files: FilesDep, caller: CallerDep) -> Response:
    await files.delete(file_id, caller)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
