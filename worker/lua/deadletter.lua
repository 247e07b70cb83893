-- Dead-letter entries and acknowledge them, as one atomic step per call.
--
-- KEYS[1] source stream, KEYS[2] dead-letter stream (same hash slot in a cluster)
-- ARGV[1] group, ARGV[2] consumer, then per entry:
--   id, error, n, field1, value1, ..., fieldn, valuen
-- An entry is moved only while it is still pending for this consumer: if another replica
-- claimed it (or it was acknowledged), it is not ours to judge, and it never appears twice.
-- Returns the ids that were moved.
local moved = {}
local i = 3
while i <= #ARGV do
  local id, err, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #pending == 1 then
    local fields = {}
    for j = i + 3, i + 2 + 2 * n do
      fields[#fields + 1] = ARGV[j]
    end
    fields[#fields + 1] = 'error'
    fields[#fields + 1] = err
    fields[#fields + 1] = 'source_id'
    fields[#fields + 1] = id
    redis.call('XADD', KEYS[2], '*', unpack(fields))
    redis.call('XACK', KEYS[1], ARGV[1], id)
    moved[#moved + 1] = id
  end
  i = i + 3 + 2 * n
end
return moved
