-- Replay dead-lettered entries: each one goes back on its source stream with its original
-- fields and leaves the dead-letter stream, in one atomic step, so an interrupted replay
-- never duplicates or drops an entry.
-- KEYS[1] dead-letter stream, KEYS[2] source stream (same slot in a cluster);
-- ARGV the dead-letter ids. The fields deadletter.lua added (error, source_id) are the last
-- pairs: they are dropped. An entry it truncated (fields_truncated) is not replayed: the
-- fields it lost may be what made it invalid (a second `counter`, say).
-- Returns {{dead id, new id}, ...}, then {ids not found}, then {ids refused: truncated}.
--
-- Redis does not undo a script's writes when a later call fails: first make sure the caller
-- may run both writes (a replica's ACL has no XDEL), so a replay never adds an entry back
-- that it then cannot delete.
if not (redis.acl_check_cmd('XADD', KEYS[2], '*', 'f', 'v')
    and redis.acl_check_cmd('XDEL', KEYS[1], '0-1')) then
  return redis.error_reply('NOPERM this user may not run XADD on the source stream and ' ..
    'XDEL on the dead-letter stream')
end
local moved, missing, truncated = {}, {}, {}
for _, id in ipairs(ARGV) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 0 then
    missing[#missing + 1] = id
  else
    local flat = found[1][2]
    local n = #flat
    if n >= 4 and flat[n - 3] == 'error' and flat[n - 1] == 'source_id' then
      n = n - 4
    end
    local fields = {}
    for i = 1, n do
      fields[i] = flat[i]
    end
    if n >= 2 and flat[n - 1] == 'fields_truncated' then
      truncated[#truncated + 1] = id
    elseif #fields == 0 then  -- an entry deleted before it was judged: nothing to replay
      missing[#missing + 1] = id
    else
      local new = redis.call('XADD', KEYS[2], '*', unpack(fields))
      redis.call('XDEL', KEYS[1], id)
      moved[#moved + 1] = {id, new}
    end
  end
end
return {moved, missing, truncated}
