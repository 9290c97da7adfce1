"""Lua scripts for the multi-key changes that must be atomic.

They use only commands Redis 6.2 has. Keys are passed in KEYS; encoded values come ready from Python,
and Lua only decodes what it must compare (the status, the export status).
"""

# Shared helpers, prepended to each script.
_HELPERS = """
local function hset_pairs(key, pairs_json)
  local obj = cjson.decode(pairs_json)
  local flat = {}
  for k, v in pairs(obj) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end
local function add_event(stream, maxlen, ev_json)
  if ev_json == '' then return nil end
  local ev = cjson.decode(ev_json)
  return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
    'type', ev['type'], 'message', ev['message'], 'time', ev['time'], 'data', ev['data'])
end
local function owner_matches(key, want)
  if want == '' then return true end
  local sup = redis.call('HGET', key, 'supervisor_id')
  return not sup or cjson.decode(sup) == want
end
local function run_matches(key, want)
  if want == '' then return true end
  local v = redis.call('HGET', key, 'run_id')
  return v and cjson.decode(v) == want
end
local function in_list(value, list_json)
  for _, v in ipairs(cjson.decode(list_json)) do
    if v == value then return true end
  end
  return false
end
"""

# KEYS: 1 job, 2 jobs index, 3 events, 4 output_dirs, 5 queue, 6 queue_meta, 7 wakeup channel,
#       8.. status indexes (one per status, in JobStatus order)
# ARGV: 1 job_id, 2 fields (JSON object of field -> encoded value), 3 created_at, 4 status,
#       5 output_dir, 6 queue score ('' = not queued), 7 queue meta, 8 event JSON, 9 events maxlen,
#       10 status list JSON (the order of KEYS 8..)
CREATE = (
    _HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local holder = redis.call('HGET', KEYS[4], ARGV[5])
if holder then return {'output_dir_busy', holder} end
hset_pairs(KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local statuses = cjson.decode(ARGV[10])
for i, s in ipairs(statuses) do
  if s == ARGV[4] then redis.call('ZADD', KEYS[7 + i], ARGV[3], ARGV[1]) end
end
redis.call('HSET', KEYS[4], ARGV[5], ARGV[1])
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
  redis.call('HSET', KEYS[6], ARGV[1], ARGV[7])
  redis.call('PUBLISH', KEYS[7], ARGV[1])
end
add_event(KEYS[3], ARGV[9], ARGV[8])
return {'ok'}
"""
)

# KEYS: 1 job, 2 events, 3 output_dirs, 4 queue, 5 queue_meta, 6 gpu_leases, 7 wakeup channel,
#       8.. status indexes
# ARGV: 1 job_id, 2 new status (encoded JSON string), 3 allowed current statuses (JSON list of plain),
#       4 fields JSON, 5 unused, 6 queue op ('add' | 'remove' | ''), 7 unused, 8 queue meta (priority re-read),
#       9 GPUs to acquire (JSON list), 10 release GPUs ('1' | '0'), 11 free output_dir ('1' | '0'),
#       12 event JSON, 13 events maxlen, 14 status list JSON (order of KEYS 8..), 15 wake ('1'|'0'),
#       16 expected supervisor id ('' = any), 17 expected run id ('' = any: a follower passes its run's)
TRANSITION = (
    _HELPERS
    + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return {'missing'} end
local cur = cjson.decode(raw)
if not in_list(cur, ARGV[3]) then return {'bad_state', cur} end
if not owner_matches(KEYS[1], ARGV[16]) then return {'not_owner', cur} end
if not run_matches(KEYS[1], ARGV[17]) then return {'other_run', cur} end
local job_id = ARGV[1]
local acquire = cjson.decode(ARGV[9])
for _, gpu in ipairs(acquire) do
  local holder = redis.call('HGET', KEYS[6], tostring(gpu))
  if holder and holder ~= job_id then return {'gpu_busy', tostring(gpu), holder} end
end
for _, gpu in ipairs(acquire) do redis.call('HSET', KEYS[6], tostring(gpu), job_id) end
if ARGV[10] == '1' then
  local held = redis.call('HGETALL', KEYS[6])
  for i = 1, #held, 2 do
    if held[i + 1] == job_id then redis.call('HDEL', KEYS[6], held[i]) end
  end
end
hset_pairs(KEYS[1], ARGV[4])
redis.call('HSET', KEYS[1], 'status', ARGV[2])
local new = cjson.decode(ARGV[2])
local statuses = cjson.decode(ARGV[14])
for i, s in ipairs(statuses) do
  if s == cur then redis.call('ZREM', KEYS[7 + i], job_id) end
  if s == new then redis.call('ZADD', KEYS[7 + i], redis.call('HGET', KEYS[1], 'created_at'), job_id) end
end
if ARGV[6] == 'add' then
  -- The priority as stored now (a PATCH may have landed since the caller read the job): same score as
  -- scheduler.queue_score, printed as an exact integer.
  local p = tonumber(redis.call('HGET', KEYS[1], 'priority'))
  local created = tonumber(redis.call('HGET', KEYS[1], 'created_at'))
  local score = string.format('%.0f', (10 - p) * 1e13 + math.floor(created * 1000))
  local meta = '[' .. p .. ',' .. string.match(ARGV[8], '^%[[^,]*,(.*)$')
  redis.call('ZADD', KEYS[4], score, job_id)
  redis.call('HSET', KEYS[5], job_id, meta)
elseif ARGV[6] == 'remove' then
  redis.call('ZREM', KEYS[4], job_id)
  redis.call('HDEL', KEYS[5], job_id)
end
if ARGV[11] == '1' then
  local dir = redis.call('HGET', KEYS[1], 'output_dir')
  if dir then
    dir = cjson.decode(dir)
    if redis.call('HGET', KEYS[3], dir) == job_id then redis.call('HDEL', KEYS[3], dir) end
  end
end
local id = add_event(KEYS[2], ARGV[13], ARGV[12])
if ARGV[15] == '1' then redis.call('PUBLISH', KEYS[7], job_id) end
return {'ok', cur, id}
"""
)

# Update fields only while the job exists and is in one of the given statuses and its export status is
# not in the refused list. KEYS: 1 job, 2 events. ARGV: 1 fields JSON, 2 allowed statuses JSON ('' = any),
# 3 refused export statuses JSON ('' = none), 4 event JSON, 5 maxlen, 6 expected supervisor id ('' = any),
# 7 expected run id ('' = any)
GUARDED_UPDATE = (
    _HELPERS
    + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return {'missing'} end
local cur = cjson.decode(raw)
if ARGV[2] ~= '' and not in_list(cur, ARGV[2]) then return {'bad_state', cur} end
if ARGV[3] ~= '' then
  local exp = redis.call('HGET', KEYS[1], 'export')
  if exp then
    local st = cjson.decode(exp)['status']
    if in_list(st, ARGV[3]) then return {'export_state', st} end
  end
end
if not owner_matches(KEYS[1], ARGV[6]) then return {'not_owner', cur} end
if not run_matches(KEYS[1], ARGV[7]) then return {'other_run', cur} end
hset_pairs(KEYS[1], ARGV[1])
add_event(KEYS[2], ARGV[5], ARGV[4])
return {'ok', cur}
"""
)

# KEYS: 1 job, 2 jobs index, 3 events, 4 history, 5 output_dirs, 6 queue, 7 queue_meta, 8 gpu_leases,
#       9.. status indexes. ARGV: 1 job_id, 2 refused statuses JSON, 3 status list JSON
DELETE = (
    _HELPERS
    + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return {'missing'} end
local cur = cjson.decode(raw)
if in_list(cur, ARGV[2]) then return {'bad_state', cur} end
local exp = redis.call('HGET', KEYS[1], 'export')
if exp and cjson.decode(exp)['status'] == 'running' then return {'export_state', 'running'} end
local job_id = ARGV[1]
local dir = redis.call('HGET', KEYS[1], 'output_dir')
if dir then
  dir = cjson.decode(dir)
  if redis.call('HGET', KEYS[5], dir) == job_id then redis.call('HDEL', KEYS[5], dir) end
end
local held = redis.call('HGETALL', KEYS[8])
for i = 1, #held, 2 do
  if held[i + 1] == job_id then redis.call('HDEL', KEYS[8], held[i]) end
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[2], job_id)
redis.call('ZREM', KEYS[6], job_id)
redis.call('HDEL', KEYS[7], job_id)
local statuses = cjson.decode(ARGV[3])
for i, _ in ipairs(statuses) do redis.call('ZREM', KEYS[8 + i], job_id) end
return {'ok', cur}
"""
)

# KEYS: 1 gpu_leases. ARGV: 1 gpu index, 2 job_id. Drops the lease only if that job still holds it.
DROP_LEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# Change the priority of a pending/queued job and re-sort it. KEYS: 1 job, 2 queue, 3 queue_meta, 4 events,
# 5 wakeup channel. ARGV: 1 job_id, 2 priority (encoded), 3 new score, 4 new meta, 5 event JSON, 6 maxlen,
# 7 updated_at (encoded)
REPRIORITIZE = (
    _HELPERS
    + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return {'missing'} end
local cur = cjson.decode(raw)
if cur ~= 'pending' and cur ~= 'queued' then return {'bad_state', cur} end
redis.call('HSET', KEYS[1], 'priority', ARGV[2], 'updated_at', ARGV[7])
if cur == 'queued' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
  redis.call('PUBLISH', KEYS[5], ARGV[1])
end
add_event(KEYS[4], ARGV[6], ARGV[5])
return {'ok', cur}
"""
)
