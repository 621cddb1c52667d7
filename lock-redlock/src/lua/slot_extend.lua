-- Sets the expiry of the permit slot ARGV[2] of the hash KEYS[1] to now + ARGV[3] ms, if the
-- token ARGV[1] holds it and it is live. Returns 1 when extended, 0 otherwise.
local key, token, slot, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
if redis.call('type', key).ok ~= 'hash' or not redis.call('hget', key, '\255permits') then
  return 0
end
local value = redis.call('hget', key, slot)
local extended = 0
if value then
  local expiry, holder = string.match(value, '^(%d+) (.*)$')
  if holder == token and tonumber(expiry) > now then
    redis.call('hset', key, slot, string.format('%.0f', now + ttl) .. ' ' .. token)
    extended = 1
  end
end
settle_slots(key, now)
return extended
