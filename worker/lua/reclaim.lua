-- Claim one page of entries idle for at least the claim idle time, any consumer's, and say
-- whose each was: the previous owner's lock lane must be held to apply it (see
-- docs/design-lock-lanes.md). XAUTOCLAIM does not report owners; this is XPENDING IDLE
-- then XCLAIM of those ids, as one atomic step.
--
-- KEYS[1] stream; ARGV[1] group, ARGV[2] the caller's name, ARGV[3] minimum idle time in
-- ms, ARGV[4] start of the page ('-' or '(<id>', exclusive), ARGV[5] page size.
-- Returns {cursor, claimed, deleted}: cursor is the last id looked at, or '0-0' once the
-- pending list is swept; claimed is {{id, fields, previous owner, delivery count}, ...}
-- (the count includes this claim); deleted lists ids no longer in the stream (XCLAIM drops
-- them from the pending list, Redis >= 7.0).
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[4], '+', ARGV[5])
if #pending == 0 then
  return {'0-0', {}, {}}
end
local ids = {}
local info = {}
for i, p in ipairs(pending) do
  ids[i] = p[1]
  info[p[1]] = p
end
-- Min-idle 0: these ids were idle long enough a moment ago, in this same atomic step (a
-- repeated check against a clock that stepped back could skip some), so an id XCLAIM does
-- not return was deleted from the stream.
local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))
local claimed = {}
local seen = {}
for _, entry in ipairs(got) do
  local p = info[entry[1]]
  seen[entry[1]] = true
  claimed[#claimed + 1] = {entry[1], entry[2], p[2], p[4] + 1}
end
local deleted = {}
for _, id in ipairs(ids) do
  if not seen[id] then
    deleted[#deleted + 1] = id
  end
end
local cursor = '0-0'
if #pending >= tonumber(ARGV[5]) then
  cursor = ids[#ids]
end
return {cursor, claimed, deleted}
