-- Turns the token ARGV[1]'s live write lease in the set KEYS[1] into a read lease with the
-- same expiry. Returns 1 when the token now holds a live read lease, 0 otherwise.
local key, token = KEYS[1], ARGV[1]
local now = now_ms()
if not marker_of(key) then
  return 0
end
local score = redis.call('zscore', key, 'w' .. token)
if score and tonumber(score) > now then
  redis.call('zrem', key, 'w' .. token)
  redis.call('zadd', key, score, 'r' .. token)
  return 1
end
score = redis.call('zscore', key, 'r' .. token)
if score and tonumber(score) > now then
  return 1
end
return 0
