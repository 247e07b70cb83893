-- Keep entries ours: of the given ids, those still pending for the caller are claimed to it
-- again with JUSTID (idle time reset, no delivery counted). Entries pending for another
-- consumer are left alone: taking them would apply them without their owner's lock lane.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] the caller's name, ARGV[3..] entry ids.
-- Returns {{id, delivery count, ...}, {id, ...}}: the entries claimed, then those that were
-- pending for the caller but are deleted from the stream (XCLAIM drops them from the
-- pending list, Redis >= 7.0).
--
-- The XCLAIM arguments are built as one table: in Lua, unpack() followed by another
-- argument expands to its first value only.
local claim = {KEYS[1], ARGV[1], ARGV[2], 0}
local counts = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p == 1 then
    claim[#claim + 1] = ARGV[i]
    counts[ARGV[i]] = p[1][4]
  end
end
local out, deleted = {}, {}
if #claim > 4 then
  local ids = #claim
  claim[ids + 1] = 'JUSTID'
  local seen = {}
  for _, id in ipairs(redis.call('XCLAIM', unpack(claim))) do
    seen[id] = true
    out[#out + 1] = id
    out[#out + 1] = counts[id]
  end
  for i = 5, ids do
    if not seen[claim[i]] then
      deleted[#deleted + 1] = claim[i]
    end
  end
end
return {out, deleted}
