-- On shutdown: the caller's replica is gone (out of the replicas set); its consumer leaves
-- the group too if nothing is pending for it.
-- KEYS[1] stream, KEYS[2] the replicas set, KEYS[3] its terms hash; ARGV[1] group, ARGV[2] the caller's name. Check
-- and removal are one atomic step: a process with the same name that gets an entry in
-- between cannot lose it.
-- Returns 1 if removed, 0 if entries are pending (they stay, for a restart or a claim).
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
