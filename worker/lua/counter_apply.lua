-- Apply a group of events to one counter, fenced by its lock, exactly once.
--
-- KEYS[1] value key, KEYS[2] lock key, KEYS[3] applied-markers key (a sorted set:
--         member 'x:<stream>|<entry id>' or 'k:<event_id>', score = expiry time in ms)
-- ARGV[1] lock token, ARGV[2] marker TTL in ms, ARGV[3] sum of the deltas (exact decimal,
--         computed by the caller: Lua numbers are doubles), or '' to only probe which
--         events already have a marker; ARGV[4] the entry marker prefix 'x:<stream>|';
--         ARGV[5] n, the number of events; ARGV[6 .. 5+n] their entry ids; then, for the
--         events that have one, pairs (event's position 1..n, event_id).
--
-- Returns one of
--   {0}                 the caller does not hold the lock: nothing written (fencing)
--   {1}                 applied: INCRBY done, markers added
--   {2, i1, i2, ...}    events i1, i2... (1-based) already have a marker: nothing written;
--                       the caller drops them and calls again with the rest and their sum
--   {3, error}          INCRBY failed (non-integer value, overflow): nothing written
--   {4}                 probe: none of the events has a marker; nothing written
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)

local prefix = ARGV[4]
local n = tonumber(ARGV[5])
local members = {}
local owner = {}
for i = 1, n do
  members[i] = prefix .. ARGV[5 + i]
  owner[i] = i
end
for j = 6 + n, #ARGV, 2 do
  members[#members + 1] = 'k:' .. ARGV[j + 1]
  owner[#members] = tonumber(ARGV[j])
end

local scores = redis.call('ZMSCORE', KEYS[3], unpack(members))
local seen = {}
local skipped = {2}
for j = 1, #members do
  if scores[j] and not seen[owner[j]] then
    seen[owner[j]] = true
    skipped[#skipped + 1] = owner[j]
  end
end
if #skipped > 1 then
  return skipped
end
if ARGV[3] == '' then
  return {4}
end

local value = redis.pcall('INCRBY', KEYS[1], ARGV[3])
if type(value) == 'table' and value.err then
  return {3, value.err}
end
local expires = now + tonumber(ARGV[2])
local zargs = {}
for j = 1, #members do
  zargs[#zargs + 1] = expires
  zargs[#zargs + 1] = members[j]
end
redis.call('ZADD', KEYS[3], unpack(zargs))
-- The key lives as long as its longest-lived marker: a replica with a shorter window
-- must not cut the life of markers written with a longer one.
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[3], last[2])
return {1}
