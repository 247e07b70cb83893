-- The group's lag (entries of the stream never delivered to it), with how sure it is, and
-- Redis' own lag field repaired when it is wrong, as one atomic step.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] the most entries to count one by one, ARGV[3]
-- '1' to repair. Returns {lag, how} with how: 'drained' (exact: the group's last delivered
-- id is the stream's last id), 'redis' (Redis' lag field, exact when Redis keeps it),
-- 'counted' (entries after the last delivered id, counted), 'capped' (at least lag), or
-- {-1, 'no group'}; then 1 if Redis' field was repaired, else 0.
--
-- Redis 7.0 can report a wrong lag for a drained group after restarts from the AOF (seen:
-- 69,344 with nothing left to deliver), and NULL after some trims or SETIDs. Drained, the
-- truth is known: XGROUP SETID ... ENTRIESREAD <entries-added> makes Redis' field 0 again,
-- so that external scalers (KEDA's lagCount) read it too.
local function map(flat)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end
local s = map(redis.call('XINFO', 'STREAM', KEYS[1]))
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = map(g)
  if info['name'] == ARGV[1] then
    local last = info['last-delivered-id']
    if last == s['last-generated-id'] then
      local repaired = 0
      if ARGV[3] == '1' and info['lag'] ~= 0 then
        redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', s['entries-added'])
        repaired = 1
      end
      return {0, 'drained', repaired}
    end
    if info['lag'] and info['lag'] <= s['length'] then
      return {info['lag'], 'redis', 0}
    end
    local cap = tonumber(ARGV[2])
    local n = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', cap + 1)
    if n > cap then
      return {cap, 'capped', 0}
    end
    return {n, 'counted', 0}
  end
end
return {-1, 'no group', 0}
