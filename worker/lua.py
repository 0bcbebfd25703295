"""Lua scripts: every step that must be atomic and fenced runs inside Redis as one script.

All keys a script touches belong to one session's partition and share its `{p<N>}` hash tag, so
the scripts also run unchanged on Redis Cluster. Every script that publishes or acks first compares
the caller's epoch with the session's epoch: a worker that lost the session (paused, partitioned,
replaced) can never write after the takeover (fencing).

Results entries are written as: type, sid, text, e (msgpack event), in that ARGV order.
"""

from __future__ import annotations

from typing import Final

# Prepended to every script that writes more than one stream: Redis does not roll back a script's
# writes when a later command in it fails, so a key of the wrong type (an operator's mistake) must
# be found before the first write, or a final could be published without its commit and then
# published again by the replay.
_WRITABLE = """
local WRONGTYPE = 'WRONGTYPE a voxqueue stream key holds another type; nothing was written'
local function writable(keys)
  for _, k in ipairs(keys) do
    local t = redis.call('TYPE', k)['ok']
    if t ~= 'stream' and t ~= 'none' then return false end
  end
  return true
end
"""

# Prepended to the scripts that judge or retire sessions entries. `entry_digest` fingerprints a
# sessions entry (every field but `sid`, sorted, length-prefixed, SHA-1): the state hash keeps the
# fingerprint of the entry that started the session (`entry_sha`), so a later entry for the same sid
# is told apart: the same fingerprint is a retried XADD (dropped silently), another one a reuse of
# the sid (`sid_reused`). `empty_with_ttl` gives a key a TTL without writing into it: an audio
# stream that does not exist yet is created EMPTY (XGROUP CREATE ... MKSTREAM, then the group is
# destroyed: no entry is ever added), so frames a producer appends later keep the TTL; the worker
# never writes an entry into a producer's audio stream.
_ENTRIES = """
local function entry_fields(stream, id)
  if id == '' then return nil end
  local found = redis.call('XRANGE', stream, id, id)
  if found[1] then return found[1][2] end
  return nil
end
local function entry_digest(f)
  if not f then return nil end
  local names, values = {}, {}
  for i = 1, #f - 1, 2 do
    if f[i] ~= 'sid' then names[#names + 1] = f[i]; values[f[i]] = f[i + 1] end
  end
  table.sort(names)
  local parts = {}
  for _, n in ipairs(names) do
    parts[#parts + 1] = #n .. ':' .. n .. '=' .. #values[n] .. ':' .. values[n]
  end
  return redis.sha1hex(table.concat(parts, ';'))
end
local function empty_with_ttl(key, ttl)
  if redis.call('EXISTS', key) == 0 then
    redis.call('XGROUP', 'CREATE', key, 'vq-ttl', '$', 'MKSTREAM')
    redis.call('XGROUP', 'DESTROY', key, 'vq-ttl')
  end
  redis.call('EXPIRE', key, ttl)
end
"""

# Prepended to the scripts that hand out an epoch (ACQUIRE, RELEASE). Epochs are fencing tokens,
# so one must never be handed out twice: they come from the partition's counter, not from the state
# hash, which can vanish (evicted) and be made anew at 0. The counter never goes below an epoch a
# state hash already holds (hashes from before the counter existed, or a counter that was lost).
_NEXT_EPOCH = """
local function next_epoch(state, counter)
  local e = redis.call('INCR', counter)
  local held = tonumber(redis.call('HGET', state, 'epoch') or '0')
  if e <= held then
    e = held + 1
    redis.call('SET', counter, e)
  end
  redis.call('HSET', state, 'epoch', e)
  return e
end
"""

# KEYS: state, sessions, epoch counter. ARGV: owner, max_takeovers, now_ms, sessions_entry_id
# Returns {status, epoch, committed_seq, committed_id, frames, finals, takeovers, stalled};
# status is ok, done (already ended), poison (crash loop), duplicate (a retried XADD of the entry
# that owns this sid: same fingerprint) or reused (another entry owns this sid and this one differs:
# the caller rejects it with `sid_reused`, lua.REJECT_SESSION). A done or duplicate entry is
# retired here (XACK + XDEL): it is no lease, and the stream must not keep it; a reused one is left
# pending for REJECT_SESSION, which reports it and retires it. `takeovers` counts every takeover;
# the crash-loop limit applies to `stalled_takeovers`, the takeovers in a row with no committed
# progress in between (`takeover_seq` remembers committed_seq at the last takeover): a long,
# healthy session whose workers die for unrelated reasons is never failed as a crash loop. A state
# hash from before `stalled_takeovers` existed counts all its takeovers as stalled. A poison reply
# carries the real commit point and counters, so the session's end reports them.
ACQUIRE: Final = (
    _ENTRIES
    + _NEXT_EPOCH
    + """
local start_id = redis.call('HGET', KEYS[1], 'start_id')
if start_id and start_id ~= ARGV[4] then
  -- A second sessions entry for the same sid. The same fields as the first (a producer retried its
  -- XADD) is harmless; other fields mean the sid was reused. A state from before fingerprints
  -- existed has none: taken as a retry, as it always was.
  local known = redis.call('HGET', KEYS[1], 'entry_sha')
  if known and known ~= entry_digest(entry_fields(KEYS[2], ARGV[4])) then
    return {'reused', 0, -1, '0-0', 0, 0, 0, 0}
  end
  redis.call('XACK', KEYS[2], 'workers', ARGV[4])
  redis.call('XDEL', KEYS[2], ARGV[4])
  return {'duplicate', 0, -1, '0-0', 0, 0, 0, 0}
end
local status = redis.call('HGET', KEYS[1], 'status')
local epoch = next_epoch(KEYS[1], KEYS[3])
if status == 'ended' or status == 'failed' then
  redis.call('XACK', KEYS[2], 'workers', ARGV[4])
  redis.call('XDEL', KEYS[2], ARGV[4])
  return {'done', epoch, -1, '0-0', 0, 0, 0, 0}
end
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed_seq') or '-1')
local takeovers = tonumber(redis.call('HGET', KEYS[1], 'takeovers') or '0')
local stalled = tonumber(redis.call('HGET', KEYS[1], 'stalled_takeovers') or takeovers)
if redis.call('HGET', KEYS[1], 'released') == '1' then
  redis.call('HDEL', KEYS[1], 'released')
elseif status then
  takeovers = redis.call('HINCRBY', KEYS[1], 'takeovers', 1)
  local last = tonumber(redis.call('HGET', KEYS[1], 'takeover_seq') or '-1')
  if committed > last then stalled = 0 else stalled = stalled + 1 end
  redis.call('HSET', KEYS[1], 'stalled_takeovers', stalled, 'takeover_seq', committed)
end
redis.call('HSET', KEYS[1], 'status', 'active', 'owner', ARGV[1], 'claimed_at', ARGV[3])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3])
if redis.call('HSETNX', KEYS[1], 'start_id', ARGV[4]) == 1 then
  local digest = entry_digest(entry_fields(KEYS[2], ARGV[4]))
  if digest then redis.call('HSET', KEYS[1], 'entry_sha', digest) end
end
redis.call('PERSIST', KEYS[1])
local verdict = 'ok'
if stalled > tonumber(ARGV[2]) then verdict = 'poison' end
return {verdict, epoch, committed,
  redis.call('HGET', KEYS[1], 'committed_id') or '0-0',
  tonumber(redis.call('HGET', KEYS[1], 'frames') or '0'),
  tonumber(redis.call('HGET', KEYS[1], 'finals') or '0'),
  takeovers, stalled}
"""
)

# KEYS: state, session results, partition results
# ARGV: epoch, seq_to, last_id ('' = none), maxlen, publish ('1'/'0'), type, sid, text, e, seq_from
#       [, channel, channels, session_seq]  (multichannel sessions only)
# Publishes a final and acknowledges the frames it covers (moves the commit point) in one step.
# Idempotent: a retry after an ambiguous failure (connection lost after sending) sees
# committed_seq >= seq_to and does nothing. A final that does not start right after the commit
# point ('stale': the caller's idea of the commit point is behind Redis, e.g. a commit whose reply
# it never saw) is refused: publishing it would repeat words; the caller re-reads and replays.
# Multichannel: the same rules per channel, on the channel's own mark `committed_seq:<channel>`
# (a channel without one is at the session's point); the session's commit point `committed_seq`
# (what a new owner replays from) is the minimum of the marks, and the caller must have computed
# the same minimum (`session_seq`), or its view of the marks is not Redis's ('stale').
COMMIT: Final = (
    _WRITABLE
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 'fenced' end
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed_seq') or '-1')
local seq_to = tonumber(ARGV[2])
if ARGV[11] then
  local channel, channels = tonumber(ARGV[11]), tonumber(ARGV[12])
  local marks = {}
  for c = 0, channels - 1 do
    local m = tonumber(redis.call('HGET', KEYS[1], 'committed_seq:' .. c) or committed)
    if m < committed then m = committed end
    marks[c] = m
  end
  if marks[channel] >= seq_to then return 'dup' end
  if marks[channel] ~= tonumber(ARGV[10]) - 1 then return 'stale' end
  marks[channel] = seq_to
  local low = seq_to
  for c = 0, channels - 1 do
    if marks[c] < low then low = marks[c] end
  end
  if low ~= tonumber(ARGV[13]) then return 'stale' end
  if not writable({KEYS[2], KEYS[3]}) then return redis.error_reply(WRONGTYPE) end
  if ARGV[5] == '1' then
    local fields = {'type', ARGV[6], 'sid', ARGV[7], 'text', ARGV[8], 'e', ARGV[9]}
    redis.call('XADD', KEYS[2], '*', unpack(fields))
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
    redis.call('HINCRBY', KEYS[1], 'finals', 1)
  end
  redis.call('HSET', KEYS[1], 'committed_seq:' .. channel, seq_to)
  if low > committed then
    redis.call('HSET', KEYS[1], 'committed_seq', low, 'frames', low + 1)
    if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'committed_id', ARGV[3]) end
  end
  return 'ok'
end
if committed >= seq_to then return 'dup' end
if committed ~= tonumber(ARGV[10]) - 1 then return 'stale' end
if not writable({KEYS[2], KEYS[3]}) then return redis.error_reply(WRONGTYPE) end
if ARGV[5] == '1' then
  local fields = {'type', ARGV[6], 'sid', ARGV[7], 'text', ARGV[8], 'e', ARGV[9]}
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
  redis.call('HINCRBY', KEYS[1], 'finals', 1)
end
redis.call('HSET', KEYS[1], 'committed_seq', seq_to, 'frames', seq_to + 1)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'committed_id', ARGV[3]) end
return 'ok'
"""
)

# KEYS: state, session results, partition results
# ARGV: epoch, maxlen, once_flag ('' = always), type, sid, text, e
# Best-effort events (partial, speech_started, utterance_end, session_started, error). With a
# once_flag the event is published at most once per session, whichever owner gets there first.
PUBLISH: Final = (
    _WRITABLE
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 'fenced' end
if not writable({KEYS[2], KEYS[3]}) then return redis.error_reply(WRONGTYPE) end
if ARGV[3] ~= '' and redis.call('HSETNX', KEYS[1], ARGV[3], '1') == 0 then return 'dup' end
local fields = {'type', ARGV[4], 'sid', ARGV[5], 'text', ARGV[6], 'e', ARGV[7]}
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
return 'ok'
"""
)

# KEYS: state. ARGV: epoch, thresholds (JSON object)
# A Flux session's end-of-turn thresholds as its `configure` entries left them, kept in the state
# hash so that a new connection, or a new owner, starts with them: the entries that set them may
# lie before the commit point, where a replay never reads.
SAVE_CONFIGURE: Final = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 'fenced' end
redis.call('HSET', KEYS[1], 'configure', ARGV[2])
return 'ok'
"""

# KEYS: state, session results, partition results, audio, sessions, dead
# ARGV: epoch, maxlen, sessions_entry_id, retention_s, status, reason, type, sid, text, e,
#       dead_reason ('' = no dead letter), frames, expect_committed ('' = no check)
# Ends a session: publishes session_ended, marks every frame done (never moving the commit point
# back: a failed session keeps it), retires the session's entry in the sessions stream (XACK ends
# the lease, XDEL keeps the stream bounded and means a recreated consumer group can never deliver
# an ended session again) and gives the session's keys the retention TTL. The entry's format,
# options and labels are copied into the state hash first, so tools (replay) still find them.
# A normal end names the commit point its owner reached: if Redis's is lower, Redis lost commits
# after it (fsync everysec and a crash, a lagging replica promoted), and ending now would lose
# their finals for good: 'stale', and the owner replays from Redis's commit point first.
FINISH: Final = (
    _WRITABLE
    + _ENTRIES
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 'fenced' end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'ended' or status == 'failed' then return 'dup' end
if ARGV[13] ~= '' and tonumber(redis.call('HGET', KEYS[1], 'committed_seq') or '-1') < tonumber(ARGV[13]) then
  return 'stale'
end
-- (the audio key is only given a TTL here, whatever its type)
if not writable({KEYS[2], KEYS[3], KEYS[6]}) then return redis.error_reply(WRONGTYPE) end
local fields = {'type', ARGV[7], 'sid', ARGV[8], 'text', ARGV[9], 'e', ARGV[10]}
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
local entry = redis.call('XRANGE', KEYS[5], ARGV[3], ARGV[3])
if entry[1] then
  local kept = {encoding = true, sample_rate = true, channels = true, frame_ms = true,
    options = true, labels = true}
  local f = entry[1][2]
  for i = 1, #f - 1, 2 do
    if kept[f[i]] then redis.call('HSET', KEYS[1], f[i], f[i + 1]) end
  end
end
redis.call('XACK', KEYS[5], 'workers', ARGV[3])
redis.call('XDEL', KEYS[5], ARGV[3])
if ARGV[11] ~= '' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[2], '*', 'sid', ARGV[8], 'reason', ARGV[11],
    'stream', KEYS[5], 'entry', ARGV[3])
end
local frames = tonumber(ARGV[12])
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed_seq') or '-1')
if frames - 1 > committed then committed = frames - 1 end
local counted = tonumber(redis.call('HGET', KEYS[1], 'frames') or '0')
if counted > frames then frames = counted end
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'reason', ARGV[6], 'ended_at', redis.call('TIME')[1],
  'frames', frames, 'committed_seq', committed)
redis.call('HDEL', KEYS[1], 'owner')
local ttl = tonumber(ARGV[4])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
-- Frames a producer appends after the end (a session that ended before its audio) must expire
-- too: an audio key that does not exist yet is created empty, carrying the TTL (XADD keeps it).
empty_with_ttl(KEYS[4], ttl)
return 'ok'
"""
)

# KEYS: sessions stream, state keys... ARGV: consumer, (entry_id, epoch) per state key
# Renews the leases this worker still holds (resets the pending entries' idle time) and reports
# the ones it lost: index (1-based) of each lost session.
RENEW: Final = """
local lost = {}
for i = 2, #KEYS do
  local entry = ARGV[(i - 1) * 2]
  local epoch = ARGV[(i - 1) * 2 + 1]
  if redis.call('HGET', KEYS[i], 'epoch') == epoch and redis.call('HGET', KEYS[i], 'owner') == ARGV[1] then
    local claimed = redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, entry, 'JUSTID')
    if #claimed == 0 then table.insert(lost, i - 1) end
  else
    table.insert(lost, i - 1)
  end
end
return lost
"""

# KEYS: sessions stream, state, epoch counter. ARGV: consumer, entry_id, epoch
# Hands a session over at once (drain): fences this owner and makes the lease look long expired,
# so the next XAUTOCLAIM anywhere takes it instead of waiting out the lease.
RELEASE: Final = (
    _NEXT_EPOCH
    + """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[3] then return 'fenced' end
if redis.call('HGET', KEYS[2], 'status') ~= 'active' then return 'done' end
next_epoch(KEYS[2], KEYS[3])
redis.call('HSET', KEYS[2], 'released', '1')
redis.call('HDEL', KEYS[2], 'owner')
redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[2], 'IDLE', 1000000000, 'JUSTID')
return 'ok'
"""
)

# KEYS: state, session results, partition results, dead
# ARGV: epoch, maxlen, flag, stream, entry_id, reason, type, sid, text, e
# Reports one bad entry once: an error event and a dead letter, idempotent across replays.
REJECT_ENTRY: Final = (
    _WRITABLE
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 'fenced' end
if not writable({KEYS[2], KEYS[3], KEYS[4]}) then return redis.error_reply(WRONGTYPE) end
if redis.call('HSETNX', KEYS[1], ARGV[3], '1') == 0 then return 'dup' end
local fields = {'type', ARGV[7], 'sid', ARGV[8], 'text', ARGV[9], 'e', ARGV[10]}
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'sid', ARGV[8], 'reason', ARGV[6],
  'stream', ARGV[4], 'entry', ARGV[5])
return 'ok'
"""
)

# KEYS: sessions, dead, partition results [, audio [, state, session results]]
#   audio: when the entry names a valid sid, that sid's audio key IN THIS PARTITION (misplaced audio
#   when the entry is in the wrong partition); state and session results: when the sid is valid and
#   belongs to this partition.
# ARGV: entry_id ('' = the entry sits in another partition's stream: write the session's side only),
#       sid (raw), reason, maxlen, retention_s, error event (type, sid, text, e),
#       session_ended event (type, sid, text, e), sid_reused error event (type, sid, text, e),
#       sid_reused reason
# Rejects one sessions entry atomically. Outcomes:
#   dup       the entry is no longer pending: handled already (idempotent across lost replies);
#   duplicate it names an existing session and has that session's fingerprint (a retried XADD of
#             the session's own entry): retired silently;
#   reused    it names an existing session (live or ended) with other fields: retired, dead
#             letter, and a non-fatal `sid_reused` error in the session's and the partition's
#             results (the session itself is untouched: no state change, no second session_ended);
#   rejected  it names a valid sid of this partition with no session yet: dead letter, the
#             session's error and session_ended(rejected) in both results streams, a state hash
#             (status failed, reason rejected, the entry's format/options/labels, its fingerprint)
#             and the retention TTL on the session's keys;
#   dead      no session to report to (no valid sid, or another partition's): dead letter, the error
#             in this partition's results, and the retention TTL on the misplaced audio stream;
#   exists    (entry_id '') the session exists already: nothing written.
REJECT_SESSION: Final = (
    _WRITABLE
    + _ENTRIES
    + """
local writes = {KEYS[2], KEYS[3]}
if #KEYS >= 4 then table.insert(writes, KEYS[4]) end
if #KEYS >= 6 then table.insert(writes, KEYS[6]) end
if not writable(writes) then return redis.error_reply(WRONGTYPE) end
local function publish(streams, base)
  local fields = {'type', ARGV[base], 'sid', ARGV[base + 1], 'text', ARGV[base + 2], 'e', ARGV[base + 3]}
  for _, key in ipairs(streams) do
    if key == KEYS[3] then
      redis.call('XADD', key, 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
    else
      redis.call('XADD', key, '*', unpack(fields))
    end
  end
end
local function dead_letter(reason)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'sid', ARGV[2], 'reason', reason,
    'stream', KEYS[1], 'entry', ARGV[1])
end
local here = ARGV[1] ~= ''
local f = nil
if here then
  f = entry_fields(KEYS[1], ARGV[1])
  if redis.call('XACK', KEYS[1], 'workers', ARGV[1]) == 0 then
    redis.call('XDEL', KEYS[1], ARGV[1])
    return 'dup'
  end
  redis.call('XDEL', KEYS[1], ARGV[1])
end
local ttl = tonumber(ARGV[5])
if #KEYS >= 6 and redis.call('EXISTS', KEYS[5]) == 1 then
  if not here then return 'exists' end
  local known = redis.call('HGET', KEYS[5], 'entry_sha')
  if known and f and known == entry_digest(f) then return 'duplicate' end
  dead_letter(ARGV[18])
  publish({KEYS[6], KEYS[3]}, 14)
  return 'reused'
end
if here then dead_letter(ARGV[3]) end
if #KEYS < 6 then
  publish({KEYS[3]}, 6)
  if #KEYS >= 4 then empty_with_ttl(KEYS[4], ttl) end
  return 'dead'
end
publish({KEYS[6], KEYS[3]}, 6)
publish({KEYS[6], KEYS[3]}, 10)
redis.call('HSET', KEYS[5], 'status', 'failed', 'reason', 'rejected', 'start_id', ARGV[1],
  'frames', 0, 'finals', 0, 'committed_seq', -1, 'ended_at', redis.call('TIME')[1])
if f then
  local kept = {encoding = true, sample_rate = true, channels = true, frame_ms = true,
    options = true, labels = true}
  for i = 1, #f - 1, 2 do
    if kept[f[i]] and #f[i + 1] <= 65536 then redis.call('HSET', KEYS[5], f[i], f[i + 1]) end
  end
end
-- Without the entry (it sits in another partition), no fingerprint can match: any later entry for
-- this sid is a reuse.
redis.call('HSET', KEYS[5], 'entry_sha', entry_digest(f) or 'none')
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('EXPIRE', KEYS[6], ttl)
-- The audio stream too, even if no frame came yet (created empty): later appends keep the TTL.
empty_with_ttl(KEYS[4], ttl)
return 'rejected'
"""
)

# KEYS: sessions. ARGV: entry_id
# Retires an entry that is no lease (a duplicate sessions entry of a session that runs).
RETIRE: Final = """
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
return redis.call('XDEL', KEYS[1], ARGV[1])
"""

# KEYS: sessions
# Trims what XDEL missed (entries acknowledged by older workers, or by anyone outside the scripts):
# every entry below the oldest one still pending (a lease) or not yet delivered is done with.
# Touches nothing unless `workers` is the stream's only group, so another group's entries are safe.
TRIM_SESSIONS: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups ~= 1 then return 0 end
local info = {}
for i = 1, #groups[1] - 1, 2 do info[groups[1][i]] = groups[1][i + 1] end
if info['name'] ~= 'workers' then return 0 end
local floor = info['last-delivered-id']
local pending = redis.call('XPENDING', KEYS[1], 'workers')
if tonumber(pending[1]) > 0 then
  floor = pending[2]
else
  -- Nothing pending: everything up to the last delivered entry is done; MINID keeps ids >= floor,
  -- so step just past it (when the sequence part is small enough for Lua's numbers).
  local ms, sq = string.match(floor, '^(%d+)%-(%d+)$')
  if ms and #sq < 15 then floor = ms .. '-' .. string.format('%d', tonumber(sq) + 1) end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""
