-- Keep entries ours: of the given ids, those still pending for the caller are claimed to it
-- again with JUSTID (idle time reset, no delivery counted). Entries pending for another
-- consumer are left alone: taking them would apply them without their owner's lock lane.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] the caller's name, ARGV[3..] entry ids.
-- Returns {id, delivery count, ...} for the entries claimed.
--
-- The XCLAIM arguments are built as one table: in Lua, unpack() followed by another
-- argument expands to its first value only.
local claim = {KEYS[1], ARGV[1], ARGV[2], 0}
local out = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p == 1 then
    claim[#claim + 1] = ARGV[i]
    out[#out + 1] = ARGV[i]
    out[#out + 1] = p[1][4]
  end
end
if #claim > 4 then
  claim[#claim + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(claim))
end
return out
