"""The Lua scripts of a job's log (job_log.py): its events and loss history, written by runners and schedulers.

Each takes one JSON argument (`a`, decoded by the shared helpers) and the job's hash as KEYS[1].
"""

from application.services.lua import HELPERS

# A runner's loss points and events, each written once though a batch whose reply an outage lost is sent again.
# a: run_id, h_from / e_from (how many points / events of this run came before these), history (encoded points),
# events, maxlen, history_max, k: {history, events, sent (hash: run, h, e: what Redis took of the current run)}.
RUN_APPEND = (
    HELPERS
    + """
local k = a.k
-- Only into its own run of a job that exists: a batch flushed after the job was deleted (or after a newer run
-- began) would otherwise leave keys that a later job under the same id inherits.
if field(KEYS[1], 'run_id') ~= a.run_id then return {'other_run', ''} end
local sent = redis.call('HMGET', k.sent, 'run', 'h', 'e')
local h_done, e_done = 0, 0
if sent[1] == a.run_id then h_done, e_done = tonumber(sent[2]), tonumber(sent[3]) end
local points = a.history or {}
local fresh = {}
for i, p in ipairs(points) do
  if a.h_from + i > h_done then fresh[#fresh + 1] = p end
  if #fresh == 1000 or (i == #points and #fresh > 0) then  -- unpack takes a few thousand values at most
    redis.call('RPUSH', k.history, unpack(fresh))
    fresh = {}
  end
end
if #points > 0 then redis.call('LTRIM', k.history, -a.history_max, -1) end
local events = a.events or {}
for i, ev in ipairs(events) do
  if a.e_from + i > e_done then add_event(k.events, ev) end
end
redis.call('HSET', k.sent, 'run', a.run_id, 'h', math.max(h_done, a.h_from + #points),
  'e', math.max(e_done, a.e_from + #events))
return {'ok'}
"""
)

# Events and loss points written by someone other than the run's runner (a scheduler, the watchdog), only while
# the job exists: a write racing its DELETE would leave keys that a later job under the same id inherits.
# a: event|nil, history (encoded points)|nil, replace (the history is `history` from now on), maxlen,
# history_max, k: {events, history}. Returns 1, or 0 when there is no such job.
APPEND = (
    HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local k = a.k
add_event(k.events, a.event)
if a.replace then redis.call('DEL', k.history) end
for _, p in ipairs(a.history or {}) do redis.call('RPUSH', k.history, p) end
if a.history then redis.call('LTRIM', k.history, -a.history_max, -1) end
return 1
"""
)
