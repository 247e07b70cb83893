-- Keep entries ours: of the given ids, those still pending for the caller are claimed to it
-- again with JUSTID (idle time reset, no delivery counted). Entries pending for another
-- consumer are left alone: taking them would apply them without their owner's lock lane.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] the caller's name, ARGV[3..] entry ids.
-- Returns {id, delivery count, ...} for the entries claimed.
local mine = {}
local out = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p == 1 then
    mine[#mine + 1] = ARGV[i]
    out[#out + 1] = ARGV[i]
    out[#out + 1] = p[1][4]
  end
end
if #mine > 0 then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine), 'JUSTID')
end
return out
