-- Remove consumers of a group that have nothing pending, have been idle for long and whose
-- replica has not said it is alive lately: replicas that were killed leave their (unique,
-- host-pid) names behind. (On Redis 7.0 a read that returns nothing does not reset a
-- consumer's idle time, so an idle but live replica looks idle: its heartbeat keeps it.)
-- KEYS[1] stream, KEYS[2] the replicas set, KEYS[3] its terms (heartbeat.lua); ARGV[1] group, ARGV[2] minimum
-- idle time in ms, ARGV[3] the caller's own name (never removed), ARGV[4] how recent a
-- heartbeat keeps a consumer (ms). Check and removal are one atomic step, so a consumer
-- that gets an entry in between cannot lose it. Returns the names removed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  local seen = tonumber(redis.call('ZSCORE', KEYS[2], info['name']) or 0)
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0
      and tonumber(info['idle']) >= tonumber(ARGV[2])
      and seen < now - tonumber(ARGV[4]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    redis.call('ZREM', KEYS[2], info['name'])
    redis.call('HDEL', KEYS[3], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
