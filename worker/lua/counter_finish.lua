-- After XACK: clear the entry markers of the acknowledged entries and release the lock,
-- for one or more counters (all in one cluster slot).
--
-- Per counter c, KEYS[2c-1] lock key, KEYS[2c] applied-markers key.
-- ARGV[1] the entry marker prefix 'x:<stream>|', ARGV[2] the caller's lock token, then per
-- counter: n, id_1 .. id_n (the ids of its acknowledged entries).
--
-- Markers are cleared when the caller still holds the lock, or when nobody does: any
-- replica that confirmed these entries pending before our XACK can no longer write (its
-- token is gone for good), and anyone who locks later sees them acknowledged. While
-- another replica holds the lock it may be about to apply them, so the markers stay (they
-- expire by TTL, or that replica clears them after its own XACK).
-- Returns per counter: 1 released (ours), 2 lock was free (markers cleared), 0 someone
-- else holds it (nothing done), or an error text if a key has the wrong type.
local replies = {}
local token = ARGV[2]
local a = 3
for c = 1, #KEYS / 2 do
  local lkey, akey = KEYS[2 * c - 1], KEYS[2 * c]
  local n = tonumber(ARGV[a])
  local holder = redis.pcall('GET', lkey)
  local reply
  if type(holder) == 'table' and holder.err then
    reply = holder.err
  elseif holder and holder ~= token then
    reply = 0
  else
    reply = 2
    if holder then
      redis.call('DEL', lkey)
      reply = 1
    end
    if n > 0 then
      local removed
      if n == 1 then
        removed = redis.pcall('ZREM', akey, ARGV[1] .. ARGV[a + 1])
      else
        local members = {}
        for i = 1, n do
          members[i] = ARGV[1] .. ARGV[a + i]
        end
        removed = redis.pcall('ZREM', akey, unpack(members))
      end
      if type(removed) == 'table' and removed.err then
        reply = removed.err
      end
    end
  end
  replies[c] = reply
  a = a + 1 + n
end
return replies
