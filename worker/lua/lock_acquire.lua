-- Take every free lock among KEYS with one token (SET NX PX each), in one call.
-- ARGV[1] token (fresh for this attempt, never reused), ARGV[2] TTL in ms.
-- Returns, per key, 1 if taken, 0 if someone holds it (it is left untouched).
local taken = {}
for i, key in ipairs(KEYS) do
  taken[i] = redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
end
return taken
