"""Uploaded data sets (POST /files): what is stored per file and what the file routes answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Purpose = Literal["sft", "pt", "rlhf"]
PURPOSES: tuple[str, ...] = ("sft", "pt", "rlhf")
FILE_ID_PATTERN = r"^file-[0-9a-f]{24}$"
FILE_ID_HELP = "a file's id, as POST /files answered it (file- and 24 hex digits)"


class FileObject(BaseModel):
    """One uploaded data set. Also the stored record (JSON under Keys.file)."""

    id: str = Field(..., examples=["file-0123456789abcdef01234567"], description=FILE_ID_HELP)
    object: Literal["file"] = "file"
    owner: str | None = Field(..., description="the key's name that uploaded it (null: uploaded without keys)")
    filename: str = Field(..., description="the client's file name, for display only (the server names the file)")
    purpose: Purpose = Field(..., description="sft, pt or rlhf (rlhf files need a rejected answer per row)")
    bytes: int = Field(..., ge=0, description="size in bytes")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the content, hex")
    rows: int | None = Field(..., description="data rows (null when too large to count)")
    rows_exact: bool = Field(..., description="false when rows is an estimate")
    format: str = Field(..., description="the row format the pre-flight check found (messages, query/response, ...)")
    created_at: float
    path: str = Field(..., description="where the server keeps it (use the id as data_path, not this path)")


class FileList(BaseModel):
    files: list[FileObject]
    total: int
    offset: int
    limit: int
    next_offset: int | None
    next_cursor: str | None = Field(
        None,
        description="pass it as `cursor` for the next page: files deleted meanwhile shift no file out of it (they do "
        "with next_offset)",
    )
