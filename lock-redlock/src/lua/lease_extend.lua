-- Sets the expiry of the token ARGV[1]'s live lease on KEYS[1] (alone or in the set; any tag in
-- ARGV[2]) to now + ARGV[3] ms. Returns 1 when extended, 0 when the lease is gone or expired.
local key, token, tags, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local alone = redis.pcall('get', key)
if type(alone) == 'string' or not alone then
  if solo_holds(alone, tags, token) then
    redis.call('pexpire', key, ARGV[3])
    return 1
  end
  return 0
end
local now = now_ms()
if not marker_of(key) then
  return 0
end
local extended = 0
for i = 1, #tags do
  local member = string.sub(tags, i, i) .. token
  local score = redis.call('zscore', key, member)
  if score and tonumber(score) > now then
    redis.call('zadd', key, 'XX', now + ttl, member)
    extended = 1
  end
end
settle_set(key, now)
return extended
