-- After XACK: per counter, clear the markers of the acknowledged entries and release the
-- lock lanes taken for it, for one or more counters (all in one cluster slot).
--
-- Per counter, in order: its applied-markers key, then the m lanes the caller took for it.
-- ARGV[1] the entry marker prefix 'x:<stream>|', ARGV[2] the caller's lock token, then per
-- counter: m, n, id_1 .. id_n (the ids of its acknowledged entries).
--
-- Markers are cleared only while the caller still holds every lane it took: then no
-- replica that confirmed these entries pending before our XACK can still write them (see
-- docs/design-lock-lanes.md). A free lane says nothing about a claimer down a chain, so if
-- any lane was lost the markers stay (the caller clears them LOCK_TTL_MS later, see
-- worker/lanes.py). Each lane still ours is released.
-- Returns per counter: 1 markers cleared and every lane released, 0 some lane was no
-- longer ours (markers kept, ours released), or an error text if a key has a wrong type.
local replies = {}
local prefix, token = ARGV[1], ARGV[2]
local a = 3
local ki = 1
local c = 0
local nargs = #ARGV
while a <= nargs do
  c = c + 1
  local akey = KEYS[ki]
  local m, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local reply = 1
  for i = ki + 1, ki + m do
    local holder = redis.pcall('GET', KEYS[i])
    if type(holder) == 'table' and holder.err then
      reply = holder.err
    elseif holder == token then
      redis.call('DEL', KEYS[i])
    elseif reply == 1 then
      reply = 0
    end
  end
  if reply == 1 and n > 0 then
    local removed
    if n == 1 then
      removed = redis.pcall('ZREM', akey, prefix .. ARGV[a + 2])
    else
      local members = {}
      for i = 1, n do
        members[i] = prefix .. ARGV[a + 1 + i]
      end
      removed = redis.pcall('ZREM', akey, unpack(members))
    end
    if type(removed) == 'table' and removed.err then
      reply = removed.err
    end
  end
  replies[c] = reply
  ki = ki + 1 + m
  a = a + 2 + n
end
return replies
