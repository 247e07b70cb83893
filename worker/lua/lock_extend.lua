-- Compare-and-extend: push the lock's expiry only if the caller's token still holds it.
-- KEYS[1] lock key; ARGV[1] token; ARGV[2] new TTL in ms.  Returns 1 if extended, 0 if not.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
