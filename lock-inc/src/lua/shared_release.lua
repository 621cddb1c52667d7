-- Gives back a permit, a read or a write lock, or takes back a waiting writer's claim, only for
-- its token. KEYS[1]: the holder set, KEYS[2]: the kind marker (see shared_acquire.lua).
-- ARGV[1]: token, ARGV[2]: its kind letter ('p', 'r' or 'w'), ARGV[3] (optional): a channel on
-- which to announce the release to waiters.
-- Returns 1 when a live holder was removed, 2 when the holder had expired (its entry, not yet
-- reclaimed, is removed all the same), 3 when a claim was taken back, 0 when nothing was ours.
if redis.replicate_commands then
  redis.replicate_commands()
end
local kind = redis.call('type', KEYS[1]).ok
if kind ~= 'zset' and kind ~= 'none' then
  return 0 -- a mutex's counter: none of ours
end
local marker = redis.call('get', KEYS[2])
if marker and string.sub(marker, 1, 1) ~= '#' then
  return 0 -- a mutex now: none of ours
end
local time = redis.call('time')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local removed = 0
local member = ARGV[2] .. ARGV[1]
local score = redis.call('zscore', KEYS[1], member)
if not score and ARGV[2] == 'w' then
  -- A downgrade whose answer was lost (a timeout) may have run: the writer's handle still says
  -- `w`, the server holds its `r` entry. Tokens are never reused, so that entry is this lease.
  member = 'r' .. ARGV[1]
  score = redis.call('zscore', KEYS[1], member)
end
if score then
  redis.call('zrem', KEYS[1], member)
  if tonumber(score) > now then
    removed = 1
  else
    removed = 2
  end
end
local claim_until = 0
if marker then
  local claimant, expiry = string.match(marker, '^#rw:(.+):(%d+)$')
  if claimant == ARGV[1] then
    marker = '#rw'
    if removed == 0 then
      removed = 3
    end
  elseif claimant and tonumber(expiry) > now then
    claim_until = tonumber(expiry)
  end
end
if removed == 0 then
  return 0
end
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
local latest = 0
local last = redis.call('zrange', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  latest = tonumber(last[2])
  redis.call('pexpireat', KEYS[1], string.format('%.0f', latest))
end
-- An emptied set is gone (Redis deletes an empty sorted set); its marker goes with it unless a
-- live claim still keeps new readers out.
local until_ms = math.max(latest, claim_until)
if until_ms > now then
  if marker then
    redis.call('set', KEYS[2], marker, 'PXAT', string.format('%.0f', until_ms))
  end
else
  redis.call('del', KEYS[1], KEYS[2])
end
if ARGV[3] then
  redis.pcall('publish', ARGV[3], '1')
end
return removed
