-- Sets a new ttl for one permit, read or write lock, only while it is live. KEYS[1]: the holder
-- set, KEYS[2]: the kind marker (see shared_acquire.lua). ARGV[1]: token, ARGV[2]: its kind
-- letter, ARGV[3]: ttl in ms. Returns 1 when extended, 0 when the lease was not (or no longer)
-- ours.
if redis.replicate_commands then
  redis.replicate_commands()
end
if redis.call('type', KEYS[1]).ok ~= 'zset' then
  return 0
end
local time = redis.call('time')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local member = ARGV[2] .. ARGV[1]
local score = redis.call('zscore', KEYS[1], member)
if not score or tonumber(score) <= now then
  -- Expired: never revived.
  return 0
end
-- The first millisecond in which it is gone, as `shared_acquire.lua` scores it.
redis.call('zadd', KEYS[1], 'XX', now + tonumber(ARGV[3]) + 1, member)
local latest = tonumber(redis.call('zrange', KEYS[1], -1, -1, 'WITHSCORES')[2])
redis.call('pexpireat', KEYS[1], string.format('%.0f', latest))
local marker = redis.call('get', KEYS[2])
if marker then
  local _, expiry = string.match(marker, '^#rw:(.+):(%d+)$')
  if expiry then
    latest = math.max(latest, tonumber(expiry))
  end
  redis.call('pexpireat', KEYS[2], string.format('%.0f', latest))
end
return 1
