#!lua flags=allow-oom
-- (allow-oom: it only removes lanes and markers or shortens their lives, and must do so
-- when Redis refuses writes that would grow memory.)
--
-- After XACK: per counter, release the lock lanes taken for it and end the markers of the
-- acknowledged entries, for one or more counters (all in one cluster slot).
--
-- Per counter, in order: its applied-markers key, then the m lanes the caller took for it.
-- ARGV[1] the entry marker prefix 'x:<stream>|', ARGV[2] the caller's lock token, ARGV[3]
-- the lock TTL in ms, then per counter: m, n, id_1 .. id_n (the ids of its acknowledged
-- entries).
--
-- Markers are removed at once only while the caller still holds every lane it took: then
-- no replica that confirmed these entries pending before our XACK can still write them
-- (see docs/design-lock-lanes.md, rule B). A free lane says nothing about a claimer down a
-- chain, so if a lane was lost, or none was taken (m = 0: entries found gone from the
-- stream's pending list some other way), the markers are cut short instead: they expire a
-- lock TTL (+10 ms) from now, by Redis' clock, when every lock taken before now has
-- expired, and the key lives as long as its longest-lived marker. Each lane still ours is
-- released.
-- Returns per counter: 1 markers removed and every lane released, 0 markers cut short
-- (lanes still ours released), or an error text if a key has a wrong type.
local replies = {}
local prefix, token = ARGV[1], ARGV[2]
local t = redis.call('TIME')
-- (+10 ms: a later apply reads TIME once it runs, a little after the instant that decides
-- whether a lock has expired)
local soon = string.format(
  '%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3]) + 10)
local SLICE = 1000 -- ids per command: Lua unpacks at most ~8,000 values into one call

-- The key lives as long as its longest-lived marker: after markers were cut short, and
-- after markers were removed from a key that still holds others (cut short before, while
-- a later apply made the key live 30 days), so that it does not outlive them.
local function rearm(akey)
  local last = redis.call('ZRANGE', akey, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', akey, last[2])
  end
end

-- The markers of ids ARGV[a+2 .. a+1+n]: removed, or (short) given a life ending soon, only
-- ever shorter (XX LT), a slice of ids at a time. nil, or an error text.
local function finish(akey, a, n, short)
  for first = 1, n, SLICE do
    local args = {}
    if short then
      args = {'XX', 'LT'}
    end
    for i = first, math.min(n, first + SLICE - 1) do
      if short then
        args[#args + 1] = soon
      end
      args[#args + 1] = prefix .. ARGV[a + 1 + i]
    end
    local done = redis.pcall(short and 'ZADD' or 'ZREM', akey, unpack(args))
    if type(done) == 'table' and done.err then
      return done.err
    end
  end
  if short then
    rearm(akey)
  end
  return nil
end

-- Keys markers were removed from: those that still exist hold other markers (cut short
-- before, while a later apply made the key live 30 days): re-arm them. One EXISTS for all
-- of them first: most are gone, emptied by the removal.
local emptied = {}
local function rearm_left(keys)
  for first = 1, #keys, SLICE do
    local slice = {unpack(keys, first, math.min(#keys, first + SLICE - 1))}
    if redis.call('EXISTS', unpack(slice)) > 0 then
      for _, key in ipairs(slice) do
        rearm(key)
      end
    end
  end
end

local a = 4
local ki = 1
local c = 0
local nargs = #ARGV
while a <= nargs do
  c = c + 1
  local akey = KEYS[ki]
  local m, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local reply = m > 0 and 1 or 0
  for i = ki + 1, ki + m do
    local holder = redis.pcall('GET', KEYS[i])
    if type(holder) == 'table' and holder.err then
      reply = holder.err
    elseif holder == token then
      redis.call('DEL', KEYS[i])
    elseif reply == 1 then
      reply = 0
    end
  end
  if n == 1 and reply == 1 then -- the common case with many counters, inline
    local done = redis.pcall('ZREM', akey, prefix .. ARGV[a + 2])
    if type(done) == 'table' and done.err then
      reply = done.err
    else
      emptied[#emptied + 1] = akey
    end
  elseif n > 0 and (reply == 1 or reply == 0) then
    reply = finish(akey, a, n, reply == 0) or reply
    if reply == 1 then
      emptied[#emptied + 1] = akey
    end
  end
  replies[c] = reply
  ki = ki + 1 + m
  a = a + 2 + n
end
rearm_left(emptied)
return replies
