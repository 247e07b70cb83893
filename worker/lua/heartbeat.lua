-- A replica says it is alive: its name scored with Redis' clock (ms) in the replicas set of
-- the stream, and names not seen for ARGV[2] ms are dropped.
-- KEYS[1] the replicas set (same slot as the stream); ARGV[1] the caller's name,
-- ARGV[2] how long a silent name is kept (ms). Returns Redis' time in ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return now
