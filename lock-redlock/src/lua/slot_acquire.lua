-- Takes the permit slot ARGV[3] of the semaphore of ARGV[4] permits in the hash KEYS[1] for the
-- token ARGV[1] with a ttl of ARGV[2] ms; KEYS[2], when given, is the fencing counter. The size
-- is checked in the same step: a hash whose live holders use another size is refused.
-- Returns the fencing value (1 without fencing) when granted, 0 when the slot is held, and a
-- string naming what the key holds when it is another kind of lock.
if redis.replicate_commands then
  redis.replicate_commands()
end
local key, token, ttl, slot, permits = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local now, time = now_ms()
local kind = redis.call('type', key).ok
if kind ~= 'none' then
  if kind ~= 'hash' or not redis.call('hget', key, '\255permits') then
    return describe(key)
  end
  local live = settle_slots(key, now)
  if live > 0 and redis.call('hget', key, '\255permits') ~= permits then
    return describe(key)
  end
  if redis.call('hexists', key, slot) == 1 then
    return 0
  end
end
local value = 1
if KEYS[2] then
  local keep
  value, keep = draw_fence(KEYS[2], time, ttl)
  if not value then
    return keep
  end
  keep()
end
redis.call('hset', key, '\255permits', permits, slot, string.format('%.0f', now + ttl) .. ' ' .. token)
settle_slots(key, now)
return value
