-- Dead-letter entries and acknowledge them, as one atomic step per call.
--
-- KEYS[1] source stream, KEYS[2] dead-letter stream (same hash slot in a cluster)
-- ARGV[1] group, ARGV[2] consumer, then per entry:
--   id, error, n, field1, value1, ..., fieldn, valuen
-- or, to copy the entry's fields from the stream (at most m of them):
--   id, error, -1, m
-- An entry is moved only while it is still pending for this consumer: if another replica
-- claimed it (or it was acknowledged), it is not ours to judge, and it never appears twice.
-- Returns the ids that were moved.
local moved = {}
local i = 3
while i <= #ARGV do
  local id, err, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local fields = {}
  if n < 0 then
    local m = tonumber(ARGV[i + 3])
    local found = redis.call('XRANGE', KEYS[1], id, id)
    local flat = found[1] and found[1][2] or {}
    for j = 1, math.min(#flat, 2 * m) do
      fields[j] = flat[j]
    end
    if #flat > 2 * m then
      fields[#fields + 1] = 'fields_truncated'
      fields[#fields + 1] = m .. ' of ' .. (#flat / 2) .. ' fields kept'
    end
    i = i + 4
  else
    for j = i + 3, i + 2 + 2 * n do
      fields[#fields + 1] = ARGV[j]
    end
    i = i + 3 + 2 * n
  end
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #pending == 1 then
    fields[#fields + 1] = 'error'
    fields[#fields + 1] = err
    fields[#fields + 1] = 'source_id'
    fields[#fields + 1] = id
    redis.call('XADD', KEYS[2], '*', unpack(fields))
    redis.call('XACK', KEYS[1], ARGV[1], id)
    moved[#moved + 1] = id
  end
end
return moved
