"""Every Redis key the server uses, built in one place under REDIS_KEY_PREFIX."""

from __future__ import annotations

from dataclasses import dataclass

from application.models.training_model import JobStatus


@dataclass(frozen=True)
class Keys:
    prefix: str

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job(self, job_id: str) -> str:
        """Hash: one field per top-level Job field, each JSON-encoded."""
        return self._k("job", job_id)

    def job_summary(self, job_id: str) -> str:
        """String: the job's list entry as JSON (lua.SUMMARY_FIELDS), rewritten by every script that changes it."""
        return self._k("job", job_id, "summary")

    def job_events(self, job_id: str) -> str:
        """Stream, capped: the job's event history."""
        return self._k("job", job_id, "events")

    def job_history(self, job_id: str) -> str:
        """List, capped: per-step loss points (JSON) for loss curves."""
        return self._k("job", job_id, "history")

    def job_sent(self, job_id: str) -> str:
        """Hash run, h, e: how many loss points and events of its current run the job's runner has had written."""
        return self._k("job", job_id, "sent")

    @property
    def health_probe(self) -> str:
        """String: written by each /health (a minute's TTL), to learn whether Redis takes writes."""
        return self._k("health", "probe")

    @property
    def summary_fields(self) -> str:
        """String: the fields the stored list summaries hold (lua.SUMMARY_FIELDS, comma-joined), as written by the
        last scheduler that checked them: a version that holds others rewrites them all at its start."""
        return self._k("summary", "fields")

    @property
    def upload_users_scanned(self) -> str:
        """String: the creation time of the newest active job whose uploads a scheduler's start has recorded."""
        return self._k("files", "users", "scanned")

    @property
    def summaries_scanned(self) -> str:
        """String: the creation time of the newest job whose summary a scheduler's start has looked at."""
        return self._k("summary", "scanned")

    @property
    def jobs_index(self) -> str:
        """Sorted set job_id -> created_at: every job, for listing newest first."""
        return self._k("jobs")

    def status_index(self, status: JobStatus | str) -> str:
        """Sorted set job_id -> created_at, one per status: filtered listing and counts."""
        value = status.value if isinstance(status, JobStatus) else status
        return self._k("jobs", "status", value)

    def owner_index(self, owner: str) -> str:
        """Sorted set job_id -> created_at: one owner's jobs (a user key lists only these)."""
        return self._k("jobs", "owner", owner)

    def owner_status_index(self, owner: str, status: JobStatus | str) -> str:
        value = status.value if isinstance(status, JobStatus) else status
        return self._k("jobs", "owner", owner, "status", value)

    @property
    def expiry(self) -> str:
        """Sorted set job_id -> finished_at of terminal jobs: what JOB_RETENTION_DAYS removes, oldest first."""
        return self._k("jobs", "expiry")

    def file(self, file_id: str) -> str:
        """String: an uploaded file's metadata (JSON of models.file_model.FileObject)."""
        return self._k("file", file_id)

    def file_users(self, file_id: str) -> str:
        """Set of 'job_id|created_at': the jobs created naming this upload as a data set (its delete is refused
        while one of them is active)."""
        return self._k("file", file_id, "users")

    @property
    def files_index(self) -> str:
        """Sorted set file_id -> created_at: every uploaded file, for an admin's listing."""
        return self._k("files")

    @property
    def uploads_writing(self) -> str:
        """Sorted set '<folder>/<file id>' -> when its upload began: uploads whose files may lie on disk without a
        record (a crash mid-upload, or between the write and the record); removed once recorded or cleaned up.
        The orphan sweep looks at these only: another deployment's uploads in a shared data root are not ours."""
        return self._k("files", "writing")

    def owner_file_bytes(self, owner: str) -> str:
        """String (integer): bytes of one owner's uploads, kept in step with its files (FILE_QUOTA_BYTES)."""
        return self._k("files", "bytes", owner)

    def owner_files(self, owner: str) -> str:
        """Sorted set file_id -> created_at: one owner's uploads (`owner` as upload_refs.owner_folder names it)."""
        return self._k("files", "owner", owner)

    def export_request(self, job_id: str) -> str:
        """String with a short TTL: held while one export request of the job checks its target and records it."""
        return self._k("export_request", job_id)

    @property
    def export_targets(self) -> str:
        """Hash export folder (`exports/<name>` of a job folder) -> who writes it (JSON, `ExportControl`): jobs
        that share an output folder share its exports. An entry is taken over once its export has ended, and dropped
        with its job's record."""
        return self._k("export_targets")

    def idempotency(self, owner: str, digest: str) -> str:
        """String with a 24 h TTL: the first response to a request with this Idempotency-Key."""
        return self._k("idempotency", owner, digest)

    def open_streams(self, owner: str) -> str:
        """Sorted set slot id -> when it lapses: one owner's open Server-Sent Events streams (owner_slots)."""
        return self._k("streams", "open", owner)

    def open_downloads(self, owner: str) -> str:
        """Sorted set slot id -> when it lapses: one owner's artifact downloads in progress (owner_slots)."""
        return self._k("artifacts", "downloading", owner)

    def open_uploads(self, owner: str) -> str:
        """Sorted set slot id -> when it lapses: one owner's uploads in progress (owner_slots)."""
        return self._k("files", "uploading", owner)

    def rate(self, owner: str, window: int) -> str:
        """Counter with a TTL: creates by one key in one fixed window."""
        return self._k("rate", "create", owner, str(window))

    @property
    def output_dirs(self) -> str:
        """Hash output_dir -> job_id for active jobs: refuses a second active job in one folder."""
        return self._k("output_dirs")

    @property
    def folder_owners(self) -> str:
        """Hash job folder -> the owner of the first job that wrote there ("" for none): another owner's job may
        not use it, nor a folder inside it or around it (`folder_owners.FolderGuard`). Kept after the jobs go:
        their files stay."""
        return self._k("folders", "owner")

    @property
    def folders(self) -> str:
        """Sorted set of the same folders, all at score 0: the folders inside one are a ZRANGEBYLEX away."""
        return self._k("folders")

    def owner_folders(self, owner: str) -> str:
        """Sorted set of the folders `folder_owners` gives `owner` ("" for none), all at score 0: whether a folder
        holds another owner's is two ZLEXCOUNTs (all folders inside it, and this owner's), whatever their number."""
        return self._k("folders", "of", owner)

    @property
    def folders_recorded(self) -> str:
        """Set once the folders of jobs stored by an older version are in `folder_owners`."""
        return self._k("folders", "indexed")

    @property
    def folders_scanned(self) -> str:
        """String: the creation time of the newest job whose folder a scheduler's start has looked at."""
        return self._k("folders", "scanned")

    @property
    def folders_indexed(self) -> str:
        """Set once every folder of `folder_owners` is also in its owner's `owner_folders` (and recorded)."""
        return self._k("folders", "indexed", "by-owner")

    @property
    def queue(self) -> str:
        """Sorted set job_id -> queue score (priority, then submission time)."""
        return self._k("queue")

    @property
    def queued_since(self) -> str:
        """Sorted set job_id -> when it (last) entered the queue: the longest wait is its first member."""
        return self._k("queue", "since")

    @property
    def queue_meta(self) -> str:
        """Hash job_id -> compact JSON of what the scheduler needs, so a pass reads no job hashes."""
        return self._k("queue", "meta")

    @property
    def gpu_leases(self) -> str:
        """Hash gpu index -> job_id: a GPU held by a running job."""
        return self._k("gpu_leases")

    @property
    def queue_head(self) -> str:
        """String: JSON [job id, since] of the first job waiting with a reservation, for the starvation rule."""
        return self._k("queue", "head")

    @property
    def head_since(self) -> str:
        """Hash job id -> since when it has been the head at times in its present stint in the queue: the
        starvation rule's clock is the job's, not restarted by a job briefly ahead of it."""
        return self._k("queue", "head_since")

    @property
    def wakeup_channel(self) -> str:
        """Pub/sub channel: anything that may let a queued job start (the leading scheduler wakes at once)."""
        return self._k("queue", "wakeup")

    @property
    def processor_stats(self) -> str:
        """Hash: the queue processor's on/off switch (`enabled`, `since`) and the leader's pass statistics."""
        return self._k("queue", "processor")

    @property
    def pass_requests(self) -> str:
        """List: ids of manual passes (POST /queue/process) the leader has yet to run."""
        return self._k("queue", "pass_requests")

    def pass_result(self, request_id: str) -> str:
        """List, short TTL: the answer to one manual pass, for the API worker waiting on it."""
        return self._k("queue", "pass_result", request_id)

    @property
    def exporting(self) -> str:
        """Set of job ids whose export is requested or running: found again after a restart without a scan."""
        return self._k("exporting")

    @property
    def exports_owed(self) -> str:
        """Sorted set, job id -> when its run's end was written: the automatic exports that runs which completed
        are still to ask for. Its runner dying between the end and the ask lost the export for good (hunt EL)."""
        return self._k("exports_owed")

    @property
    def leader(self) -> str:
        """String with a TTL: `<fencing token>:<scheduler id>` of the scheduler that may start and stop runs."""
        return self._k("scheduler", "leader")

    @property
    def starts_held(self) -> str:
        """String with a TTL: why no run starts until it expires (set by a leader that saw Redis restart, kept for
        whichever scheduler leads next)."""
        return self._k("scheduler", "starts_held")

    @property
    def redis_run(self) -> str:
        """String: the run_id of the Redis server the last scheduler took the lead on (`INFO server`); another one
        now says Redis restarted since, perhaps from an older state."""
        return self._k("scheduler", "redis_run")

    @property
    def leader_epoch(self) -> str:
        """Counter: each new leadership takes the next value as its fencing token."""
        return self._k("scheduler", "epoch")

    def runner_heartbeat(self, job_id: str, ident: str | None = None) -> str:
        """String with a TTL: the heartbeat of the runner of a job's run or export `ident` (JSON: run id, kind, id,
        host, pid): one each, since a job's export and its resumed run may have runners at once. Without `ident`,
        the key one per job that runners of earlier versions beat (read while such runners may still run)."""
        return self._k("runner", job_id, ident) if ident is not None else self._k("runner", job_id)

    @property
    def gpu_snapshot(self) -> str:
        """String: the scheduler's last GPU reading (JSON), for API workers that have no GPUs of their own."""
        return self._k("gpus")

    @property
    def swift_info(self) -> str:
        """String: what the scheduler learned of the installed ms-swift (bin, version; small JSON with a stamp)."""
        return self._k("swift")

    @property
    def swift_probe(self) -> str:
        """String: the probe's whole answer (argument fields, model registry; ~200 KB JSON), read when the stamp
        in `swift_info` changes."""
        return self._k("swift", "probe")

    def step_profile(self, digest: str) -> str:
        """List, newest first, capped: [seconds per sample, overhead] of finished runs of one model, GPU count,
        max_length and train type (`predictions.profile_key`)."""
        return self._k("history", "profile", digest)

    def run_durations(self, digest: str) -> str:
        """List, newest first, capped: durations (s) of finished runs of similar jobs (`predictions.similar_key`)."""
        return self._k("history", "similar", digest)

    @property
    def history_version(self) -> str:
        """Counter: bumped by every run recorded, so the scheduler retries predictions only when history grew."""
        return self._k("history", "version")

    @property
    def webhooks(self) -> str:
        """List: notifications waiting for delivery (JSON: job id, event, the job's summary, its webhook_url)."""
        return self._k("webhooks", "queue")

    @property
    def webhooks_delivering(self) -> str:
        """List: notifications the leader took and is delivering (back to the queue if it dies meanwhile)."""
        return self._k("webhooks", "delivering")

    def webhook_attempts(self, delivery: str) -> str:
        """Hash, expiring: a delivery's URL (its digest) -> the attempts made to post it, by any leader."""
        return self._k("webhooks", "attempts", delivery)

    @property
    def webhook_signing(self) -> str:
        """Hash: owner ("" for no keys) -> how many times its signing key was rotated (absent: never)."""
        return self._k("webhooks", "signing")

    @property
    def webhooks_global(self) -> str:
        """String, present while WEBHOOK_URLS is set: every job notifies, not only those with a webhook_url."""
        return self._k("webhooks", "global")

    def metric(self, name: str) -> str:
        """Hash: a metric kept for every process to read (e.g. scheduling_latency: histogram bucket -> count)."""
        return self._k("metrics", name)

    @property
    def prediction_errors(self) -> str:
        """List, newest first, capped: actual / predicted duration of finished jobs that had a prediction."""
        return self._k("history", "errors")
