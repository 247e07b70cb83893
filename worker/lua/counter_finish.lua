-- After XACK: clear the entry markers of the acknowledged entries and release the lock.
--
-- KEYS[1] lock key, KEYS[2] applied-markers key; ARGV[1] token, ARGV[2] the entry marker
-- prefix 'x:<stream>|', ARGV[3..] the ids of the acknowledged entries.
-- Markers are cleared when the caller still holds the lock, or when nobody does: any
-- replica that confirmed these entries pending before our XACK can no longer write (its
-- token is gone for good), and anyone who locks later sees them acknowledged. While
-- another replica holds the lock it may be about to apply them, so the markers stay (they
-- expire by TTL, or that replica clears them after its own XACK).
-- Returns 1 released (ours), 2 lock was free (markers cleared), 0 someone else holds it.
local holder = redis.call('GET', KEYS[1])
local result = 2
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  result = 1
elseif holder then
  return 0
end
if #ARGV > 2 then
  local members = {}
  for i = 3, #ARGV do
    members[#members + 1] = ARGV[2] .. ARGV[i]
  end
  redis.call('ZREM', KEYS[2], unpack(members))
end
return result
