-- Remove consumers of a group that have nothing pending and have been idle for long:
-- replicas that were killed leave their (unique, host-pid) names behind.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] minimum idle time in ms, ARGV[3] the caller's
-- own name (never removed). Check and removal are one atomic step, so a consumer that
-- gets an entry in between cannot lose it. Returns the names removed.
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0
      and tonumber(info['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
