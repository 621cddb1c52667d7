-- Turns the token ARGV[1]'s live write lease on KEYS[1] (alone or in the set) into a read
-- lease with the same expiry. Returns 1 when the token now holds a live read lease, 0 otherwise.
local key, token = KEYS[1], ARGV[1]
local alone = redis.pcall('get', key)
if type(alone) == 'string' or not alone then
  if solo_holds(alone, 'w', token) then
    local marker = solo_parts(alone)
    redis.call('set', key, marker .. '\0r' .. token, 'KEEPTTL')
    return 1
  end
  return solo_holds(alone, 'r', token) and 1 or 0
end
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
