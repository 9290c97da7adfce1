"""What GET /jobs/{id}/artifacts answers: the files of a job's output folder and the folders to fetch as tar."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FileKind = Literal["checkpoint", "merged", "logging", "image", "tensorboard", "log", "args", "other"]
FolderKind = Literal["checkpoint", "merged", "run"]


class ArtifactFile(BaseModel):
    path: str = Field(..., description="relative to the output folder; GET .../artifacts/{path} downloads it")
    size: int = Field(..., description="bytes")
    mtime: float = Field(..., description="when it was last written (Unix seconds)")
    kind: FileKind = Field(..., description="what swift or the server wrote it as")
    run: str | None = Field(
        None, description="the run folder it belongs to (v0-YYYYMMDD-HHMMSS; a resume makes v1-...)"
    )


class ArtifactFolder(BaseModel):
    path: str
    kind: FolderKind
    run: str | None = None
    tar: str = Field(..., description="GET .../artifacts/{tar} streams the folder as an uncompressed tar")
    size: int = Field(..., description="bytes of the files listed under it")


class ArtifactLink(BaseModel):
    path: str = Field(..., description="a symlink such as last-checkpoint; downloads follow it")
    target: str = Field(..., description="where it points, relative to the output folder")


NOT_READ = (
    "why the job's folder is not read, when it is not: it leads elsewhere since the job was created (a symlink on "
    "its way), or lies outside OUTPUT_ROOT, which moved (leave a link at the old path)"
)


class ArtifactList(BaseModel):
    job_id: str
    files: list[ArtifactFile]
    folders: list[ArtifactFolder]
    links: list[ArtifactLink] = Field(
        default_factory=list, description="symlinks pointing inside the folder (those pointing out are left out)"
    )
    total_bytes: int = Field(..., description="the sum of the sizes of the files listed")
    truncated: bool = Field(False, description="the folder holds more entries than one listing looks at")
    not_read: str | None = Field(None, description=NOT_READ)
