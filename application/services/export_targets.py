"""Who writes each export folder (Keys.export_targets): claimed by a job's export before it runs, so that two
jobs' exports never write one folder, and given back when the job's record is deleted.

`ClusterStore` extends this class (callers use it).
"""

from __future__ import annotations

import json
from typing import Any

from application.models.training_model import TERMINAL_STATUSES, Job
from application.services.keys import Keys


class ExportTargets:
    r: Any
    keys: Keys
    # CLAIM_EXPORT_TARGET and RELEASE_EXPORT_TARGETS, registered by the store.
    _claim_export_target: Any
    _release_export_targets: Any

    async def export_target(self, target: str) -> str | None:
        """Who writes the export folder `target` (Keys.export_targets), as claimed."""
        raw: str | None = await self.r.hget(self.keys.export_targets, target)
        return raw

    async def claim_export_target(self, target: str, expect: str | None, value: str) -> bool:
        """`target` claimed with `value` ("": released) if its entry is still `expect` (None: none)."""
        return bool(await self._claim_export_target(keys=[self.keys.export_targets], args=[json.dumps(
            {"target": target, "expect": expect or "", "value": value})]))  # fmt: skip

    async def release_export_targets(self, job: Job) -> None:
        """After `job`'s record is deleted: the export folders it claimed are claimed by no one (but those its
        quantized export jobs still write); of a quantized export's job, the folder it wrote."""
        ended = [json.dumps(s.value) for s in TERMINAL_STATUSES]
        exports = [e for e in (job.export, *job.exports) if e.output_dir]
        if exports:
            # (an empty map: cjson makes [] of it, which the script indexes all the same)
            children = {e.output_dir: self.keys.job(e.job_id) for e in exports if e.job_id}
            await self._release_export_targets(keys=[self.keys.export_targets], args=[json.dumps({
                "of": job.job_id, "targets": [e.output_dir for e in exports], "children": children,
                "ended": ended})])  # fmt: skip
        argv = job.export_argv or []
        if job.kind == "export" and job.export_of and "--output_dir" in argv[:-1]:
            # A quantized export's own folder, left claimed by its job's delete while it ran (hunt BR): kept for
            # good once the job went, and taken for that job's again by one created later under its id.
            target = argv[argv.index("--output_dir") + 1]
            await self._release_export_targets(keys=[self.keys.export_targets], args=[json.dumps({
                "of": job.export_of, "job": job.job_id, "targets": [target], "children": {},
                "ended": ended})])  # fmt: skip
