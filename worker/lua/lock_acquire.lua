-- Take every free lock among n lock keys with one token (SET NX PX each), in one call,
-- taking turns on busy locks.
--
-- KEYS[1..n] lock keys, then waiter keys for the first w of them (w = #KEYS - n, may be 0:
-- plain SET NX). A caller that finds such a lock busy writes its name in the lock's waiter
-- key (if no one else waits); a caller that finds it free but another name waiting lets
-- that one have it. So a replica that keeps coming back to a hot counter cannot take it
-- again and again while another waits. (The caller passes waiter keys for the counters it
-- just had or wanted: a waiter can only be behind a lock that is in use, and a counter
-- busy once is among them on the next attempt.)
-- ARGV[1] token (fresh for this attempt, never reused), ARGV[2] lock TTL in ms,
-- ARGV[3] n, ARGV[4] the caller's name, ARGV[5] waiter TTL in ms.
-- Returns, per lock, 1 if taken, 0 if busy or left to a waiter.
local n = tonumber(ARGV[3])
local w = #KEYS - n
local me = ARGV[4]
local taken = {}
for i = 1, n do
  local turns = i <= w
  local waiter = false
  if turns then
    waiter = redis.call('GET', KEYS[n + i])
  end
  if waiter and waiter ~= me then
    taken[i] = 0
  elseif redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    taken[i] = 1
    if waiter then
      redis.call('DEL', KEYS[n + i])
    end
  else
    taken[i] = 0
    if turns then -- queue up, or renew our place (another waiter keeps theirs)
      local current = waiter or redis.call('GET', KEYS[n + i])
      if not current or current == me then
        redis.call('SET', KEYS[n + i], me, 'PX', ARGV[5])
      end
    end
  end
end
return taken
