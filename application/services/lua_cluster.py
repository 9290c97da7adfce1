"""Lua scripts for the shared state that is not a job's record: the scheduler's leader lock, uploads and their
users, per-owner slots, the queue's wait clocks and the folder index's marker (`lua.py` holds the job scripts).
Keys are built by `Keys`, never here; values come as one JSON argument where there are several."""

# The scheduler's leader lock. KEYS[1]: the lock. a: value, ttl_ms, epoch (the counter's key).
# ACQUIRE takes it when free, with the next fencing token in its value, or takes back one its caller holds (an
# acquire whose reply timed out had taken it: no scheduler led for a whole TTL); RENEW extends it only for its
# holder; RELEASE frees it only for its holder.
LEADER_ACQUIRE = """
local a = cjson.decode(ARGV[1])
local held = redis.call('GET', KEYS[1])
if held then
  if string.sub(held, -(#a.id + 1)) ~= ':' .. a.id then return false end
  redis.call('PEXPIRE', KEYS[1], a.ttl_ms)
  return held
end
local token = redis.call('INCR', a.epoch)
local value = tostring(token) .. ':' .. a.id
redis.call('SET', KEYS[1], value, 'PX', a.ttl_ms)
return value
"""

LEADER_RENEW = """
local a = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[1]) ~= a.value then return 0 end
return redis.call('PEXPIRE', KEYS[1], a.ttl_ms)
"""

LEADER_RELEASE = """
local a = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[1]) ~= a.value then return 0 end
return redis.call('DEL', KEYS[1])
"""

# An idempotency claim's answer, stored unless another request holds the key now: a worker whose lease lapsed
# and whose key a retry claimed since leaves that retry's claim alone; one whose lease lapsed with nobody
# retrying still stores its answer (else a later retry would run the request again). a: value, answer, ttl_s.
CLAIM_ANSWER = """
local a = cjson.decode(ARGV[1])
local now = redis.call('GET', KEYS[1])
if now and now ~= a.value then return 0 end
redis.call('SET', KEYS[1], a.answer, 'EX', a.ttl_s)
return 1
"""

# KEYS: the file's record, the owner's index, the index of all files, the owner's byte count. a: id, meta, created,
# bytes, quota (0: none). Stores an upload's record only if its bytes keep the owner within the quota: the count
# is never raised past it, not even for a moment (a parallel upload that fits was refused for one that did not).
# Returns {'ok', held} or {'over', what it would have been}.
STORE_FILE = """
local a = cjson.decode(ARGV[1])
-- Run again (its first reply lost, a retried connection): stored once, counted once.
if redis.call('EXISTS', KEYS[1]) == 1 then return {'ok', redis.call('GET', KEYS[4]) or '0'} end
local held = tonumber(redis.call('GET', KEYS[4]) or '0') + a.bytes
if a.quota > 0 and held > a.quota then return {'over', string.format('%.0f', held)} end
redis.call('SET', KEYS[1], a.meta)
redis.call('ZADD', KEYS[2], a.created, a.id)
redis.call('ZADD', KEYS[3], a.created, a.id)
redis.call('INCRBY', KEYS[4], a.bytes)
return {'ok', string.format('%.0f', held)}
"""

# KEYS: the file's record, the owner's index, the index of all files, the owner's byte count, the jobs that named
# it (Keys.file_users). a: id, bytes, active (the status indexes of jobs that may still read it).
# Refused while one of those jobs is active; in the same step as the create script records a job's files, so a
# job created at the moment of the delete either is seen here or finds the record gone and is refused.
# Only the call that removes the record gives its bytes back: two deletes at once count them once.
# Returns {'ok'}, {'gone'} or {'in_use', job ids...}.
FORGET_FILE = """
local a = cjson.decode(ARGV[1])
local busy = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  -- 'id|created_at': the status indexes are scored by creation time, so a job that only shares the id is not it.
  local id, created = string.match(member, '^(.*)|([^|]*)$')
  local active = false
  for _, index in ipairs(id and a.active or {}) do
    local score = redis.call('ZSCORE', index, id)
    if score and tonumber(score) == tonumber(created) then active = true break end
  end
  -- (an inactive one stays: a refused delete must not forget a stopped job that a resume makes active again)
  if active then busy[#busy + 1] = id end
end
if #busy > 0 then
  table.sort(busy)
  return {'in_use', unpack(busy)}
end
if redis.call('DEL', KEYS[1]) == 0 then return {'gone'} end
redis.call('DEL', KEYS[5])
redis.call('ZREM', KEYS[2], a.id)
redis.call('ZREM', KEYS[3], a.id)
-- (a counter back at 0 goes: one per owner who ever uploaded stayed for ever, hunt AN)
if redis.call('DECRBY', KEYS[4], a.bytes) <= 0 then redis.call('DEL', KEYS[4]) end
return {'ok'}
"""

# KEYS: an owner's slots of one kind (Keys.open_streams, .open_uploads). a: id, now, expires, cap, ttl_ms. The
# lapsed slots go, then the rest are counted: -1 when this one was added, else how many are held (the cap is reached).
OWNER_SLOT = """
local a = cjson.decode(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', a.now)
local held = redis.call('ZCARD', KEYS[1])
if held >= a.cap then return held end
redis.call('ZADD', KEYS[1], a.expires, a.id)
redis.call('PEXPIRE', KEYS[1], a.ttl_ms)
return -1
"""

# When a job still queued entered the queue, if not known yet (a record of an older version). KEYS: the
# queued status index, queued_since; ARGV: the id, its queued_at.
QUEUED_SINCE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1]) end
return 0
"""

# Entries of jobs no longer queued (a downgrade's: an older version's moves left them), dropped: the oldest of them
# was /metrics' longest wait for good (review EA). KEYS: the queued status index, queued_since; ARGV: the ids.
QUEUED_SINCE_STALE = """
local n = 0
for _, id in ipairs(ARGV) do
  if not redis.call('ZSCORE', KEYS[1], id) then n = n + redis.call('ZREM', KEYS[2], id) end
end
return n
"""

# The queue's head, and since when it is (kept as the job's own until it leaves the queue: the store's scripts drop
# it then), while it is still queued: written for a job gone meanwhile, a later stint under its id would inherit
# an old clock. KEYS: the queue, queue_head, head_since; ARGV: the id, since, and the clock the caller read for it
# ('' for none): written only while that clock still stands (a priority change, or a stint that ended, forgot it
# after the pass read it, and the pass wrote it back: at once hard at its new priority).
SET_HEAD = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local read = redis.call('HGET', KEYS[3], ARGV[1])
if ARGV[3] ~= '' and (not read or tonumber(read) ~= tonumber(ARGV[3])) then return 0 end
-- (the time as given: cjson would write it rounded to 14 digits)
redis.call('SET', KEYS[2], '[' .. cjson.encode(ARGV[1]) .. ',' .. ARGV[2] .. ']')
return redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2])
"""

# KEYS: the jobs index, Keys.folders_indexed, Keys.folders, Keys.folders_recorded. 1 when the folders are
# recorded, or with neither a job nor a folder stored, when there is nothing of an older version to record: the
# markers are set here, so that users' creates on a new install need not wait for a scheduler's first start.
MARK_FOLDERS_INDEXED_IF_EMPTY = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
if redis.call('ZCARD', KEYS[1]) > 0 or redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
redis.call('SET', KEYS[4], '1')
redis.call('SET', KEYS[2], '1')
return 1
"""

# The heads of their priorities (`Plan.heads`) and since when, each kept as the job's own, as SET_HEAD keeps the
# queue's, while it is still queued. KEYS: the queue, head_since; ARGV: since, the ids.
MARK_HEADS = """
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[1]) end
end
return 0
"""

# Folders of jobs a version that did not record them stored after the first upgrade (a downgrade's), each as
# the owner's of its first job, and only where none is recorded: a create since may have recorded it. KEYS[1]:
# Keys.folder_owners; a: folders ({folder, owner, mine: Keys.owner_folders(owner)}), all (Keys.folders).
# Returns how many it recorded.
RECORD_MISSING_FOLDERS = """
local a = cjson.decode(ARGV[1])
local n = 0
for _, f in ipairs(a.folders) do
  if redis.call('HSETNX', KEYS[1], f.folder, f.owner) == 1 then
    redis.call('ZADD', a.all, 0, f.folder)
    redis.call('ZADD', f.mine, 0, f.folder)
    n = n + 1
  end
end
return n
"""

# What a create reads before it stores the job, as one command: a pipeline of eight costs an API worker several
# times the CPU in the client library. KEYS: the GPU reading, ms-swift facts, queue head, history version, leader,
# folders_indexed, the start hold (read as one MGET), GPU leases, the running index, the queue, the processor's
# statistics, the heads' clocks, then the caller's rate window when creates are rate limited. ARGV[1]: that
# window's expiry in seconds (0: no limit). The window is set with its expiry before it is counted: the counter
# never exists without one.
CREATE_CONTEXT = """
local out = {
  redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]),
  redis.call('HGETALL', KEYS[8]),
  redis.call('ZRANGE', KEYS[9], 0, -1),
  redis.call('ZCARD', KEYS[10]),
  redis.call('HGET', KEYS[11], 'enabled'),
  false,
  redis.call('HGETALL', KEYS[12]),
}
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('SET', KEYS[13], 0, 'EX', ttl, 'NX')
  out[6] = redis.call('INCR', KEYS[13])
end
return out
"""

# KEYS[1]: Keys.export_targets. a: target, expect (what the caller read: '' for none), value. Set only while the
# entry still holds what the caller read, so that of two requests that both found a folder free one wins.
CLAIM_EXPORT_TARGET = """
local a = cjson.decode(ARGV[1])
if (redis.call('HGET', KEYS[1], a.target) or '') ~= a.expect then return 0 end
if a.value == '' then redis.call('HDEL', KEYS[1], a.target) else redis.call('HSET', KEYS[1], a.target, a.value) end
return 1
"""

# KEYS[1]: Keys.export_targets. a: of (a job whose record was deleted), targets (the folders its exports wrote),
# children (target -> the job hash of the quantized export writing it), ended (terminal statuses, as stored),
# job|nil (a quantized export's job whose record was deleted: of is its parent, and only its own claim goes).
# Each entry still claimed by that job goes (nothing else ever dropped one: the hash grew with every export),
# but one whose quantized export job has not ended: it still writes there.
RELEASE_EXPORT_TARGETS = """
local a = cjson.decode(ARGV[1])
local ended = {}
for _, s in ipairs(a.ended) do ended[s] = true end
for _, target in ipairs(a.targets) do
  local held = redis.call('HGET', KEYS[1], target)
  local holder = held and cjson.decode(held)
  if holder and holder['of'] == a.of and (not a.job or holder['job'] == a.job) then
    local child = a.children and a.children[target]
    local status = child and redis.call('HGET', child, 'status')
    if not status or ended[status] then redis.call('HDEL', KEYS[1], target) end
  end
end
return 0
"""

# KEYS: Keys.redis_run, Keys.starts_held, Keys.jobs_index, the running index. a: why, ms, fresh_since. The
# run_id is Redis's, from INFO read here (none when INFO is refused: then no restart is told). Redis restarted since
# the leader last asked when the run_id recorded is another, or when none is and jobs are stored (a snapshot from
# before a version that records it), unless every one of them was created since `fresh_since` and none runs: a new
# deployment whose first job came before the scheduler's first look (it waited out a hold, told "Redis
# restarted": hunt CW). Then starts are held `ms`. The run_id is recorded only with its hold, so that a hold that
# could not be written is not missed by the next leader to ask. Returns {restarted, the hold's ms left (0: none),
# why}.
RESTART_HOLD = """
local a = cjson.decode(ARGV[1])
local info = redis.pcall('INFO', 'server')
local run_id = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or nil
local restarted = false
if run_id then
  local previous = redis.call('GET', KEYS[1])
  if previous then
    restarted = previous ~= run_id
  else
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    restarted = oldest[2] ~= nil and (tonumber(oldest[2]) < a.fresh_since or redis.call('ZCARD', KEYS[4]) > 0)
  end
  if restarted then redis.call('SET', KEYS[2], a.why, 'PX', a.ms) end
  redis.call('SET', KEYS[1], run_id)
end
local left = redis.call('PTTL', KEYS[2])
return {restarted and 1 or 0, left > 0 and left or 0, left > 0 and redis.call('GET', KEYS[2]) or ''}
"""

# KEYS[1]: gpu leases, KEYS[2]: the holder's record, KEYS[3]: the running index. a: gpu, id. Drops the lease
# only if that job still holds it (1), and not while its record says it runs on that GPU: then the index lost it
# (a key evicted or deleted), which is put back (-1). Dropped, the lease went to a queued job beside the run
# (hunt CI: three trainers on two GPUs).
DROP_LEASE = """
local a = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], a.gpu) ~= a.id then return 0 end
if redis.call('HGET', KEYS[2], 'status') == '"running"' then
  local gpus = redis.call('HGET', KEYS[2], 'gpu_ids')
  for _, g in ipairs(gpus and cjson.decode(gpus) or {}) do
    if tostring(g) == a.gpu then
      redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[2], 'created_at'), a.id)
      return -1
    end
  end
end
return redis.call('HDEL', KEYS[1], a.gpu)
"""

# KEYS[1]: the queue, KEYS[2]: its meta. ARGV: first, last rank. The queue's length and a window of it with its
# entries' meta, read at one moment: a page whose "length" was read apart from its entries disagreed with them
# while jobs came and went (hunt CH). HMGET by the thousand: unpack() stops at Lua's C stack (some 8,000 values).
QUEUE_PAGE = """
local ids = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])
local metas = {}
for i = 1, #ids, 1000 do
  local got = redis.call('HMGET', KEYS[2], unpack(ids, i, math.min(i + 999, #ids)))
  for j = 1, #got do metas[#metas + 1] = got[j] end
end
return {redis.call('ZCARD', KEYS[1]), ids, metas}
"""
