-- A replica says it is alive, and on what terms it works: its name scored with Redis'
-- clock (ms) in the replicas set of the stream, its terms (protocol version and the
-- settings every replica must share) in the terms hash. Names silent for ARGV[2] ms are
-- dropped from both.
-- KEYS[1] the replicas set, KEYS[2] the terms hash (both in the stream's slot);
-- ARGV[1] the caller's name, ARGV[2] how long a silent name is kept (ms), ARGV[3] its
-- terms, ARGV[4] how recent a heartbeat must be to count as alive (ms).
-- Returns {name, terms, ...} of every live replica (the caller too).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - keep)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
local live = {}
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[4]), '+inf')) do
  live[#live + 1] = name
  live[#live + 1] = redis.call('HGET', KEYS[2], name) or ''
end
return live
