"""Lua scripts for the multi-key changes of a job's record that must be atomic (`lua_cluster.py`: the rest).

Each script takes the job's hash as KEYS[1] and one JSON argument, ARGV[1], holding its values and the
names of the other keys it touches (built by `Keys`, never here). Values come encoded from Python; Lua
decodes only what it compares (a status, an export status, a run id). Only Redis 6.2 commands are used.
A refusal is returned as {reason, current status, detail}; `JobStore` turns the reason into `Refusal`.
"""

# What a job list shows of each job (JobSummary), kept as one JSON string per job (`Keys.job_summary`) that
# every script changing the job rewrites: a page is then one MGET, and nothing is decoded to serve it.
# A new field goes at the end: an entry an older version wrote is told by its last field's absence (job_summaries).
SUMMARY_FIELDS = ("job_id", "status", "priority", "owner", "model_path", "data_path", "output_dir", "num_gpus",
                  "gpu_ids", "created_at", "queued_at", "started_at", "finished_at", "progress", "export",
                  "error_message", "predicted_duration", "kind", "export_of", "error_code")  # fmt: skip
_SUMMARY_FIELDS_LUA = "{" + ", ".join(f"'{f}'" for f in SUMMARY_FIELDS) + "}"

# Shared helpers, prepended to each script.
HELPERS = (
    """
local a = cjson.decode(ARGV[1])
local function hset_pairs(key, obj)
  local flat = {}
  for k, v in pairs(obj) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end
local function add_event(stream, ev)
  if not ev then return nil end
  return redis.call('XADD', stream, 'MAXLEN', '~', a.maxlen, '*', 'type', ev.type, 'message', ev.message,
    'time', ev.time, 'actor', ev.actor, 'data', ev.data)
end
local function field(key, name)
  local raw = redis.call('HGET', key, name)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function member(value, list)
  if not list then return false end
  for _, v in ipairs(list) do
    if v == value then return true end
  end
  return false
end
local function fenced(key)
  -- The job the caller read, not one created since under its id (by another owner, perhaps): as if missing.
  if a.created and redis.call('HGET', key, 'created_at') ~= a.created then return 'missing' end
  -- A runner writes only into its own run; a scheduler starts and stops runs only while it leads.
  if a.run_id and field(key, 'run_id') ~= a.run_id then return 'other_run' end
  if a.fence and redis.call('GET', a.k.leader) ~= a.fence then return 'not_leader' end
  return nil
end
local function reindex(idx, id, from, to, score)
  if not idx then return end
  if from and idx[from] then redis.call('ZREM', idx[from], id) end
  if to and idx[to] then redis.call('ZADD', idx[to], score, id) end
end
local function release_leases(leases, id)
  local held = redis.call('HGETALL', leases)
  for i = 1, #held, 2 do
    if held[i + 1] == id then redis.call('HDEL', leases, held[i]) end
  end
end
local function forget_head(k, id)
  -- The starvation rule's clock belongs to the job that waited: a later stint in the queue (or a later job
  -- given the same id) starts its own.
  redis.call('HDEL', k.head_since, id)
  local raw = redis.call('GET', k.queue_head)
  if raw and cjson.decode(raw)[1] == id then redis.call('DEL', k.queue_head) end
end
local function leave_queue_and_sweeps(k, id)
  -- A job whose record goes: out of the queue and of what the watchdog sweeps (retention, exports).
  redis.call('ZREM', k.queue, id)
  redis.call('ZREM', k.queued_since, id)
  redis.call('HDEL', k.queue_meta, id)
  redis.call('ZREM', k.expiry, id)
  redis.call('SREM', k.exporting, id)
  forget_head(k, id)
end
local function drop_entries(k, id)
  -- Everything of a job whose record goes but its record and status indexes: leases, list indexes, the queue,
  -- the sweeps, and its events, loss history and summary (kept without an expiry, they stayed for good).
  release_leases(k.leases, id)
  redis.call('ZREM', k.all, id)
  if k.owner_all then redis.call('ZREM', k.owner_all, id) end
  leave_queue_and_sweeps(k, id)
  redis.call('DEL', k.events, k.history, k.summary, k.sent)
end
local function queue_webhook(k, id, event, from, at, ev, message)
  -- When anyone listens (the job's own URL, or the operator's): with the job as it is after this step, the
  -- event's message (why: a retry's cause, a preemption's job), and the event's id as the delivery's, however
  -- often it is sent.
  local hook = field(KEYS[1], 'webhook_url')
  if hook == cjson.null then hook = nil end
  if hook or redis.call('EXISTS', k.webhooks_global) == 1 then
    redis.call('LPUSH', k.webhooks, cjson.encode({job_id = id, event = event, from = from, hook = hook or '',
      summary = redis.call('GET', k.summary), at = at, id = ev and (id .. '/' .. ev) or nil, message = message}))
  end
end
local function free_output_dir(dirs, id)
  local dir = field(KEYS[1], 'output_dir')
  if dir and redis.call('HGET', dirs, dir) == id then redis.call('HDEL', dirs, dir) end
end
local SUMMARY = """
    + _SUMMARY_FIELDS_LUA
    + """
local function refresh_summary(summary_key)
  -- The stored JSON values joined as they are: the summary decodes nothing either.
  local vals = redis.call('HMGET', KEYS[1], unpack(SUMMARY))
  local kv = {}
  for j, name in ipairs(SUMMARY) do kv[j] = '"' .. name .. '":' .. (vals[j] or 'null') end
  redis.call('SET', summary_key, '{' .. table.concat(kv, ',') .. '}')
end
"""
)

# A new job: its hash, the indexes of its status (all and its owner's), its output folder, the queue when it
# is queued, the first event. a: id, fields, created_at, status, output_dir, score|nil, meta, event, maxlen,
# cap|nil (the owner's most pending + queued jobs: counted here, so that overlapping creates cannot pass it),
# uploads (ids of the uploaded files it names: each must still have its record, and the job is recorded as a
# user of each, see FORGET_FILE), claim|nil ({key, value}: an Idempotency-Key's claim that must still hold),
# k: {all, owner_all|nil, status, owner_status|nil, events, history, sent, output_dirs, queue, queue_meta, wakeup,
#     summary, owner_pending|nil, owner_queued|nil, upload_files, upload_users (the uploads' Keys.file and
#     .file_users)}.
# Returns {'ok'}, or {'ok', its rank in the queue} for a queued job.
# Where a folder overlaps another owner's job folder: the first folder it lies in (or itself) that is another
# owner's, or the first folder inside it that is; nil when neither. It writes (the repair below). f: owner ("" for
# none), ancestors (the folder and the folders it lies in, up to OUTPUT_ROOT), prefix (the folder and "/");
# owners, folders, mine: `Keys.folder_owners`, `Keys.folders`, `Keys.owner_folders(owner)`.
_FOREIGN_FOLDER = """
local function foreign_folder(f, owners, folders, mine)
  for _, dir in ipairs(f.ancestors) do
    local owner = redis.call('HGET', owners, dir)
    if owner and owner ~= f.owner then return dir end
  end
  -- Every folder that starts with the prefix ('0' is the byte after '/'), against the owner's own: counted, not
  -- walked (an owner with 100,000 folders under one made each such check walk them all, and Redis with it).
  local lo, hi = '[' .. f.prefix, '(' .. string.sub(f.prefix, 1, -2) .. '0'
  local total = redis.call('ZLEXCOUNT', folders, lo, hi)
  -- One not in the owner's set is another owner's, or the owner's own recorded by a version that kept no such set
  -- (an API worker not yet upgraded): that one goes into the set, and the next is looked for. At most 64 such a
  -- check (past them, refused: the safe side; what it put in the set counts at the next check).
  local base = redis.call('ZLEXCOUNT', folders, '-', '(' .. f.prefix)  -- the rank of the range's first
  for _ = 1, 64 do
    if total <= redis.call('ZLEXCOUNT', mine, lo, hi) then return nil end
    -- The first folder of the range that is not the owner's: the first k whose count of the owner's folders up
    -- to it falls short of k + 1 (the owner's are a part of all), by bisection over ranks, O(log n) each step.
    local lo_k, hi_k = 0, total - 1
    while lo_k < hi_k do
      local mid = math.floor((lo_k + hi_k) / 2)
      local at = redis.call('ZRANGE', folders, base + mid, base + mid)[1]
      if redis.call('ZLEXCOUNT', mine, lo, '[' .. at) >= mid + 1 then lo_k = mid + 1 else hi_k = mid end
    end
    local first = redis.call('ZRANGE', folders, base + lo_k, base + lo_k)[1]
    if redis.call('HGET', owners, first) ~= f.owner then return first end
    redis.call('ZADD', mine, 0, first)
  end
  return string.sub(f.prefix, 1, -2)
end
"""

# a: the folder (as above) and k: {owners, folders, mine}.
FOREIGN_FOLDER = (
    """
local a = cjson.decode(ARGV[1])
"""
    + _FOREIGN_FOLDER
    + """
return foreign_folder(a.folder, a.k.owners, a.k.folders, a.k.mine) or false
"""
)

CREATE = (
    HELPERS
    + _FOREIGN_FOLDER
    + """
local k = a.k
-- A request with an Idempotency-Key creates only while its claim is held: a worker that stalled past its lease
-- (a retry then created the job) created it a second time when it woke. A lapsed claim is lost too: a retry's
-- record may have lapsed after its create (its answer not kept), and nothing tells that from nobody retrying.
if a.claim and redis.call('GET', a.claim.key) ~= a.claim.value then return {'claim_lost'} end
if a.cap then
  local waiting = redis.call('ZCARD', k.owner_pending) + redis.call('ZCARD', k.owner_queued)
  if waiting >= a.cap then return {'waiting_cap', '', tostring(waiting)} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
-- Whose folder it lies in comes first: neither a job there nor a file is any of this caller's business.
if a.folder.check and foreign_folder(a.folder, k.folder_owners, k.folders, k.owner_folders) then
  return {'foreign_folder'}
end
local holder = redis.call('HGET', k.output_dirs, a.output_dir)
if holder then return {'output_dir_busy', '', holder} end
if a.folder.is_file then return {'output_is_file'} end
for i, file in ipairs(k.upload_files or {}) do
  if redis.call('EXISTS', file) == 0 then return {'upload_gone', '', a.uploads[i]} end
end
-- With its creation time: a later job given the same id (this one deleted) is not taken for this one.
for _, users in ipairs(k.upload_users or {}) do redis.call('SADD', users, a.id .. '|' .. a.created_at) end
hset_pairs(KEYS[1], a.fields)
redis.call('ZADD', k.all, a.created_at, a.id)
redis.call('ZADD', k.status, a.created_at, a.id)
if k.owner_all then
  redis.call('ZADD', k.owner_all, a.created_at, a.id)
  redis.call('ZADD', k.owner_status, a.created_at, a.id)
end
redis.call('HSET', k.output_dirs, a.output_dir, a.id)
if redis.call('HSETNX', k.folder_owners, a.output_dir, a.folder.owner) == 1 then
  redis.call('ZADD', k.owner_folders, 0, a.output_dir)
end
redis.call('ZADD', k.folders, 0, a.output_dir)
refresh_summary(k.summary)
-- Under this id there is no job: anything kept under its names is a deleted one's (a write that raced the delete).
redis.call('DEL', k.events, k.history, k.sent)
add_event(k.events, a.event)
if a.score then
  redis.call('ZADD', k.queue, a.score, a.id)
  redis.call('ZADD', k.queued_since, a.created_at, a.id)
  redis.call('HSET', k.queue_meta, a.id, a.meta)
  redis.call('PUBLISH', k.wakeup, a.id)
  return {'ok', redis.call('ZRANK', k.queue, a.id)}
end
return {'ok'}
"""
)

# The one way a status changes. a: id, to, allowed (current statuses it may leave), fields, queue ('add' |
# 'remove'), priority (the one `score` was computed from), score, meta, acquire (GPU indexes), terminal,
# event, maxlen, wake, run_id|nil, fence|nil (the leader lock's value), finished_at|nil, cap|nil (the owner's
# pending + queued jobs a move into the queue may not reach), refuse_export|nil (export statuses that refuse it),
# parent|nil ({id, job, events, event}: a quantized export's end, told to the job it exports; its expiry renewed),
# k: {events, output_dirs, queue, queue_meta, leases, wakeup, expiry, leader, summary, status {s: key},
#     owner_status {s: key}|nil, queue_head, head_since}
TRANSITION = (
    HELPERS
    + """
local k = a.k
local cur = field(KEYS[1], 'status')
if not cur then return {'missing'} end
if not member(cur, a.allowed) then return {'bad_state', cur} end
if a.refuse_export then
  local exp = field(KEYS[1], 'export')
  if exp and member(exp.status, a.refuse_export) then return {'export_state', cur, exp.status} end
end
local refused = fenced(KEYS[1])
if refused then return {refused, cur} end
for name, was in pairs(a.unchanged or {}) do
  if (redis.call('HGET', KEYS[1], name) or '') ~= was then return {'changed', cur, name} end
end
local dir = nil
if a.reopen then
  -- Out of a terminal state (resume): the output folder must be free again, and it is claimed again.
  dir = field(KEYS[1], 'output_dir')
  local holder = redis.call('HGET', k.output_dirs, dir)
  if holder and holder ~= a.id then return {'output_dir_busy', cur, holder} end
  -- Its uploads must still be there (a delete sees the job active from this step on, as for a create).
  for _, f in ipairs(a.uploads or {}) do
    if redis.call('EXISTS', f.file) == 0 then return {'upload_gone', cur, f.id} end
  end
end
if a.queue == 'add' and field(KEYS[1], 'priority') ~= a.priority then
  return {'priority_changed', cur}  -- a PATCH landed since the caller read it: it computes the score again
end
if a.cap and k.owner_status and cur ~= 'pending' and cur ~= 'queued' then
  -- A resume adds a waiting job as a create does: the owner's cap counts it the same way.
  local waiting = redis.call('ZCARD', k.owner_status.pending) + redis.call('ZCARD', k.owner_status.queued)
  if waiting >= a.cap then return {'waiting_cap', cur, tostring(waiting)} end
end
local id = a.id
for _, gpu in ipairs(a.acquire) do
  local holder = redis.call('HGET', k.leases, tostring(gpu))
  if holder and holder ~= id then return {'gpu_busy', cur, tostring(gpu) .. ':' .. holder} end
end
for _, gpu in ipairs(a.acquire) do redis.call('HSET', k.leases, tostring(gpu), id) end
if a.release then release_leases(k.leases, id) end
if dir then
  redis.call('HSET', k.output_dirs, dir, id)
  redis.call('ZREM', k.expiry, id)
  local created = redis.call('HGET', KEYS[1], 'created_at')
  for _, f in ipairs(a.uploads or {}) do redis.call('SADD', f.users, id .. '|' .. created) end
end
hset_pairs(KEYS[1], a.fields)
redis.call('HSET', KEYS[1], 'status', cjson.encode(a.to))
local created = redis.call('HGET', KEYS[1], 'created_at')
reindex(k.status, id, cur, a.to, created)
reindex(k.owner_status, id, cur, a.to, created)
if a.queue == 'add' then
  redis.call('ZADD', k.queue, a.score, id)
  redis.call('ZADD', k.queued_since, a.since, id)
  redis.call('HSET', k.queue_meta, id, a.meta)
else
  redis.call('ZREM', k.queue, id)
  redis.call('ZREM', k.queued_since, id)
  redis.call('HDEL', k.queue_meta, id)
  if cur == 'queued' then forget_head(k, id) end
end
if a.terminal then
  free_output_dir(k.output_dirs, id)
  redis.call('ZADD', k.expiry, a.finished_at, id)
end
refresh_summary(k.summary)
local ev = add_event(k.events, a.event)
if a.parent then
  -- Only on the job whose export list names this export job (not on another job created since under its id).
  local listed = false
  for _, e in ipairs(field(a.parent.job, 'exports') or {}) do
    if type(e) == 'table' and e.job_id == id then listed = true end
  end
  if listed then
    add_event(a.parent.events, a.parent.event)
    -- Kept JOB_RETENTION_DAYS from its exports' ends, a quantized one's too (XX: only a job that ended).
    redis.call('ZADD', k.expiry, 'XX', 'GT', a.finished_at, a.parent.id)
  end
end
if a.wake then redis.call('PUBLISH', k.wakeup, id) end
-- Webhooks: an end, a pause, or a run sent back to the queue (preempted, retried), when anyone listens.
if member(a.to, a.notify_on) or (a.to == 'queued' and cur == 'running') then
  queue_webhook(k, id, 'status_' .. a.to, cur, a.finished_at or a.event.time, ev, a.event.message)
end
return {'ok', cur, ev}
"""
)

# Set fields while the job exists, is in one of `statuses` (when given) and its export status is not in
# `refuse_export` (when given); `exporting` true/false adds/removes it in the set of exports to watch in the
# same step, so an export's end and the next export's request can never undo each other.
# a: id, fields, statuses|nil, refuse_export|nil, exporting|nil, event|nil, maxlen, run_id|nil, notify|nil (a
# webhook's event, queued in the same step: an export's end), now, k: {events, summary, exporting, webhooks,
# webhooks_global, expiry}
GUARDED_UPDATE = (
    HELPERS
    + """
local cur = field(KEYS[1], 'status')
if not cur then return {'missing'} end
if a.statuses and not member(cur, a.statuses) then return {'bad_state', cur} end
if a.refuse_export then
  local exp = field(KEYS[1], 'export')
  if exp and member(exp.status, a.refuse_export) then return {'export_state', cur, exp.status} end
end
local refused = fenced(KEYS[1])
if refused then return {refused, cur} end
if a.claim and redis.call('GET', a.claim.key) ~= a.claim.value then return {'claim_lost', cur} end
for name, was in pairs(a.unchanged or {}) do
  if (redis.call('HGET', KEYS[1], name) or '') ~= was then return {'changed', cur, name} end
end
hset_pairs(KEYS[1], a.fields)
if a.exporting == true then
  redis.call('SADD', a.k.exporting, a.id)
elseif a.exporting == false then
  redis.call('SREM', a.k.exporting, a.id)
  -- An ended job's record is kept JOB_RETENTION_DAYS from its export's end too (XX: only one that ended).
  redis.call('ZADD', a.k.expiry, 'XX', 'GT', a.now, a.id)
end
refresh_summary(a.k.summary)
local ev = add_event(a.k.events, a.event)
if a.notify then
  queue_webhook(a.k, a.id, a.notify, cur, a.event and a.event.time or a.now, ev, a.event and a.event.message)
end
return {'ok', cur}
"""
)

# Out of the set of exports to watch, unless its export runs (a request may have come since the caller read
# the job). a: id, k: {exporting}
FORGET_IDLE_EXPORT = (
    HELPERS
    + """
local exp = field(KEYS[1], 'export')
if exp and exp.status == 'running' then return 0 end
redis.call('SREM', a.k.exporting, a.id)
return 1
"""
)

# Remove a job's record and every index entry, unless its status is in `refuse` or its export runs; a job whose
# status is in `unended` is notified of as `job_deleted` (no status of it ever will be).
# a: id, refuse, unended, now, k: {all, owner_all|nil, events, history, summary, output_dirs, queue, queue_meta,
# leases, expiry, exporting, status {s: key}, owner_status|nil, queue_head, head_since, upload_users
# (Keys.file_users of its uploads), webhooks, webhooks_global}
DELETE = (
    HELPERS
    + """
local k = a.k
local cur = field(KEYS[1], 'status')
if not cur then return {'missing'} end
if fenced(KEYS[1]) then return {'missing'} end
if member(cur, a.refuse) then return {'bad_state', cur} end
local exp = field(KEYS[1], 'export')
if exp and exp.status == 'running' then return {'export_state', cur, 'running'} end
local id = a.id
free_output_dir(k.output_dirs, id)
-- No longer a user of its uploads: the member the create added ('id|created_at', the time as stored).
local created = redis.call('HGET', KEYS[1], 'created_at')
for _, users in ipairs(k.upload_users or {}) do redis.call('SREM', users, id .. '|' .. created) end
-- (with the job's summary as it was: before it goes)
if member(cur, a.unended) then queue_webhook(k, id, 'job_deleted', cur, a.now, nil, a.message) end
redis.call('DEL', KEYS[1])
drop_entries(k, id)
reindex(k.status, id, cur, nil, 0)
reindex(k.owner_status, id, cur, nil, 0)
return {'ok', cur}
"""
)

# The index entries of a job whose record is gone (evicted by a Redis that evicts keys, or deleted by hand): out
# of the queue, whose plan gave it GPUs pass after pass, and out of the running index, whose GPUs stayed leased to
# it. Nothing while the record exists. a: id, output_dir|nil, k: {all, status (every status index), owner_all|nil,
# owner_status|nil (the owner's, when its summary named one), output_dirs, queue, queue_meta, queued_since,
# leases, queue_head, head_since, expiry, exporting, summary, events, history, sent}. Its events and loss history
# go too: kept without an expiry, they stayed for good (hunt CD; its export claims: JobStore.forget_lost).
FORGET_LOST = (
    HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local k, id = a.k, a.id
for _, index in pairs(k.status) do redis.call('ZREM', index, id) end
for _, index in pairs(k.owner_status or {}) do redis.call('ZREM', index, id) end
if a.output_dir and redis.call('HGET', k.output_dirs, a.output_dir) == id then
  redis.call('HDEL', k.output_dirs, a.output_dir)
end
drop_entries(k, id)
return 1
"""
)

# Change a pending/queued job's priority and re-sort it. a: priority (encoded), score, meta, event (its message
# and data are written here, from the priority it replaces), maxlen, updated_at (encoded), id,
# k: {queue, queue_meta, events, wakeup, summary, queue_head, head_since}
REPRIORITIZE = (
    HELPERS
    + """
local k = a.k
local cur = field(KEYS[1], 'status')
if not cur then return {'missing'} end
if fenced(KEYS[1]) then return {'missing'} end
if cur ~= 'pending' and cur ~= 'queued' then return {'bad_state', cur} end
-- The one it replaces now, not the one the caller read: concurrent changes each named a stale "from".
local was = redis.call('HGET', KEYS[1], 'priority')
a.event.message = 'priority changed from ' .. was .. ' to ' .. a.priority
a.event.data = cjson.encode({from = tonumber(was), to = tonumber(a.priority)})
redis.call('HSET', KEYS[1], 'priority', a.priority, 'updated_at', a.updated_at)
refresh_summary(k.summary)
if cur == 'queued' then
  redis.call('ZADD', k.queue, a.score, a.id)
  -- Its first item, in place: a prediction the scheduler set since the caller read the job stays.
  local raw = redis.call('HGET', k.queue_meta, a.id)
  local rest = raw and string.find(raw, ',', 1, true)
  redis.call('HSET', k.queue_meta, a.id, rest and ('[' .. a.priority .. string.sub(raw, rest)) or a.meta)
  -- Its clock was of its time at the head of another priority: kept, a job raised was at once hard there, and
  -- had runs preempted for it (review CM).
  if was ~= a.priority then forget_head(k, a.id) end
  redis.call('PUBLISH', k.wakeup, a.id)
end
add_event(k.events, a.event)
return {'ok', cur}
"""
)

# A prediction found for a job that waits: on the job, and in its queue entry's meta (its 6th item of 7, or of 8
# with a retry's time: between the two commas before the owner, whose name has none), changed in place so a
# concurrent priority change is not undone, as text (cjson would round the submission time to 14 digits).
# a: id, predicted, seconds (encoded), k {queue_meta, summary}
SET_PREDICTION = (
    HELPERS
    + """
local cur = field(KEYS[1], 'status')
if cur ~= 'pending' and cur ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'predicted_duration', a.predicted, 'queued_prediction', a.predicted)
refresh_summary(a.k.summary)
local raw = redis.call('HGET', a.k.queue_meta, a.id)
local m = raw and cjson.decode(raw)
if m and (#m == 7 or #m == 8) then
  local commas = {}
  for at in string.gmatch(raw, '(),') do commas[#commas + 1] = at end
  local last, before = commas[#commas - (#m - 7)], commas[#commas - (#m - 7) - 1]
  redis.call('HSET', a.k.queue_meta, a.id, string.sub(raw, 1, before) .. a.seconds .. string.sub(raw, last))
elseif m then  -- (an entry of an older version, without its owner)
  m[6] = cjson.decode(a.seconds)
  redis.call('HSET', a.k.queue_meta, a.id, cjson.encode(m))
end
return 1
"""
)

# Rewrite one job's summary (for records stored before summaries were kept). a: k {summary}
REFRESH_SUMMARY = (
    HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
refresh_summary(a.k.summary)
return 1
"""
)
