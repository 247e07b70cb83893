-- Apply events to counters, each fenced by its lock lanes, exactly once. One call may carry
-- several counters (all in one cluster slot); each counter is handled on its own and
-- nothing one counter does can fail another.
--
-- Per counter, in order: its value key, its entry-markers key (a sorted set: member
-- 'x:<stream>|<entry id>', score = expiry in ms), its event_id-markers key (member
-- 'k:<event_id>'; only for counters with k > 0 below), then the m lock lanes the caller
-- needs for its entries (its own, and those of the consumers it claimed them from). The
-- two kinds of marker live in two keys because they live for different times: an entry
-- marker until its XACK (ENTRY_MARKER_TTL_MS at most, so that it outlives outages), an
-- event_id marker for the dedupe window. (Workers before this layout kept 'k:' markers in
-- the entry-markers key too; they are looked up there as well.)
-- ARGV[1] event_id marker life in ms (the dedupe window), ARGV[2] entry marker life in ms,
-- ARGV[3] the entry marker prefix 'x:<stream>|', ARGV[4] the lock token the caller holds
-- every lane with, then per counter:
--   m, total, n, id_1 .. id_n, k, (position, event_id) * k
-- where total is the exact sum of the deltas (computed by the caller: Lua numbers are
-- doubles), or '' to only probe which events already have a marker.
--
-- Returns one reply per counter:
--   0                   the caller does not hold every lane: nothing written (fencing)
--   1                   applied: INCRBY done, markers added
--   {2, i1, i2, ...}    events i1, i2... (1-based) already have a marker: nothing written;
--                       the caller drops them and calls again with the rest and their sum
--   {3, error}          a command failed (non-integer value, overflow, wrong key type):
--                       nothing written for this counter
--   4                   probe: none of the events has a marker; nothing written
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- As strings, once: a Lua number passed to redis.call is formatted on every call.
local kexpires = string.format('%d', now + tonumber(ARGV[1]))
local xexpires = string.format('%d', now + tonumber(ARGV[2]))
local horizon = string.format('%d', now)
local prefix = ARGV[3]
local token = ARGV[4]

local function failed(reply)
  return type(reply) == 'table' and reply.err
end

-- nil when the caller's token holds every lane KEYS[lanes .. lanes+m-1], else the reply
local function fenced(lanes, m)
  for i = lanes, lanes + m - 1 do
    local holder = redis.pcall('GET', KEYS[i])
    if failed(holder) then
      return {3, holder.err}
    end
    if holder ~= token then
      return 0
    end
  end
  return nil
end

-- ids are ARGV[first .. first+n-1]; event_id pairs start at ARGV[efirst] (k of them)
-- The key lives as long as its longest-lived marker: a replica with a shorter window must
-- not cut the life of markers written with a longer one.
local function live_until(key, expires)
  if redis.call('PEXPIREAT', key, expires, 'NX') == 0 then
    redis.call('PEXPIREAT', key, expires, 'GT')
  end
end

local function apply(vkey, akey, ekey, lanes, m, total, first, n, efirst, k)
  local refused = fenced(lanes, m)
  if refused then
    return refused
  end
  local members = {}
  local owner = {}
  for i = 1, n do
    members[i] = prefix .. ARGV[first + i - 1]
    owner[i] = i
  end
  for j = 0, k - 1 do
    members[n + 1 + j] = 'k:' .. ARGV[efirst + 2 * j + 1]
    owner[n + 1 + j] = tonumber(ARGV[efirst + 2 * j])
  end
  local scores = redis.pcall('ZMSCORE', akey, unpack(members))
  if failed(scores) then
    return {3, scores.err}
  end
  local estale = false
  if k > 0 then
    local escores = redis.pcall('ZMSCORE', ekey, unpack(members, n + 1))
    if failed(escores) then
      return {3, escores.err}
    end
    for j = 1, k do
      local score = escores[j]
      if score and tonumber(score) <= now then
        estale = true
      elseif score then
        scores[n + j] = score
      end
    end
  end
  local seen = {}
  local skipped = {2}
  local stale = false
  for j = 1, #members do
    local score = scores[j]
    if score then
      if tonumber(score) <= now then
        stale = true -- expired: as if absent
      elseif not seen[owner[j]] then
        seen[owner[j]] = true
        skipped[#skipped + 1] = owner[j]
      end
    end
  end
  -- Expired markers are removed when met, and now and then anyway (bounded memory for a
  -- busy counter whose key never expires); an idle key expires as a whole.
  if stale or now % 32 == 0 then
    redis.call('ZREMRANGEBYSCORE', akey, '-inf', horizon)
  end
  if k > 0 and (estale or now % 32 == 0) then
    redis.call('ZREMRANGEBYSCORE', ekey, '-inf', horizon)
  end
  if #skipped > 1 then
    return skipped
  end
  if total == '' then
    return 4
  end
  local value = redis.pcall('INCRBY', vkey, total)
  if failed(value) then
    return {3, value.err}
  end
  local zargs = {}
  for j = 1, n do
    zargs[2 * j - 1] = xexpires
    zargs[2 * j] = members[j]
  end
  redis.call('ZADD', akey, unpack(zargs))
  live_until(akey, xexpires)
  if k > 0 then
    zargs = {}
    for j = 1, k do
      zargs[2 * j - 1] = kexpires
      zargs[2 * j] = members[n + j]
    end
    redis.call('ZADD', ekey, unpack(zargs))
    live_until(ekey, kexpires)
  end
  return 1
end

-- The common case with many counters: one event, no event_id. The same steps as apply()
-- without its tables.
local function apply_one(vkey, akey, lanes, m, total, id)
  local refused = fenced(lanes, m)
  if refused then
    return refused
  end
  local member = prefix .. id
  local score = redis.pcall('ZSCORE', akey, member)
  if failed(score) then
    return {3, score.err}
  end
  if score and tonumber(score) > now then
    return {2, 1}
  end
  if score or now % 32 == 0 then
    redis.call('ZREMRANGEBYSCORE', akey, '-inf', horizon)
  end
  if total == '' then
    return 4
  end
  local value = redis.pcall('INCRBY', vkey, total)
  if failed(value) then
    return {3, value.err}
  end
  redis.call('ZADD', akey, xexpires, member)
  if redis.call('PEXPIREAT', akey, xexpires, 'NX') == 0 then -- live_until(), inline
    redis.call('PEXPIREAT', akey, xexpires, 'GT')
  end
  return 1
end

local replies = {}
local a = 5
local ki = 1
local c = 0
local nargs = #ARGV
while a <= nargs do
  c = c + 1
  local m, total, n = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  local k = tonumber(ARGV[a + 3 + n])
  local v, mk = KEYS[ki], KEYS[ki + 1]
  if k == 0 then
    if n == 1 then
      replies[c] = apply_one(v, mk, ki + 2, m, total, ARGV[a + 3])
    else
      replies[c] = apply(v, mk, nil, ki + 2, m, total, a + 3, n, a + 4 + n, 0)
    end
    ki = ki + 2 + m
  else
    replies[c] = apply(v, mk, KEYS[ki + 2], ki + 3, m, total, a + 3, n, a + 4 + n, k)
    ki = ki + 3 + m
  end
  a = a + 4 + n + 2 * k
end
return replies
