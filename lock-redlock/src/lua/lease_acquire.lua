-- Takes a permit ('p'), a read ('r') or a write ('w') lease on KEYS[1] for the token
-- ARGV[1] with a ttl of ARGV[2] ms: ARGV[3] is the tag, ARGV[4] the kind's marker, ARGV[5] the
-- number of permits (for 'p'), ARGV[6] '1' when a refused writer will wait (it then leaves its
-- claim in KEYS[2], which keeps new readers out). KEYS[3], when given, is the fencing counter.
-- Returns the fencing value (1 without fencing) when granted, 0 when refused, and a string
-- naming what the key holds when it is another kind of lock.
if redis.replicate_commands then
  redis.replicate_commands()
end
local key, claim = KEYS[1], KEYS[2]
local token, ttl, tag, marker = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
-- Alone on a free key: one string (a semaphore has at least one permit; a writer needs no
-- one gone).
local function take_alone()
  if tag == 'r' and redis.call('exists', claim) == 1 then
    return 0
  end
  local value = 1
  if KEYS[3] then
    local keep
    value, keep = draw_fence(KEYS[3], select(2, now_ms()), ttl)
    if not value then
      return keep
    end
    keep()
  end
  if tag == 'w' then
    redis.call('del', claim)
  end
  redis.call('set', key, marker .. '\0' .. tag .. token, 'PX', ARGV[2])
  return value
end
local kind = redis.call('type', key).ok
if kind == 'none' then
  return take_alone()
end
local now, time = now_ms()
if not as_set(key, now) then
  return describe(key)
end
kind = redis.call('type', key).ok
if kind == 'none' then
  -- The lease alone here ended in this very millisecond.
  return take_alone()
end
local holders = 0
do
  local found = marker_of(key)
  if not found then
    return describe(key)
  end
  -- Expired holders go; the key's expiry (its latest holder's) stays right.
  redis.call('zremrangebyscore', key, '(0', now)
  holders = redis.call('zcard', key) - 1
  if holders <= 0 then
    redis.call('del', key)
    holders, kind = 0, 'none'
  elseif found ~= marker then
    return describe(key)
  end
end
local admitted
if tag == 'p' then
  admitted = holders < tonumber(ARGV[5])
elseif tag == 'r' then
  admitted = redis.call('exists', claim) == 0
  if admitted and holders == 1 then
    -- A writer is always alone: one holder may be a writer, several are readers.
    local only = redis.call('zrange', key, 1, 1)[1]
    admitted = string.sub(only, 1, 1) ~= 'w'
  end
else
  admitted = holders == 0
  if not admitted and ARGV[6] == '1' then
    redis.call('set', claim, token, 'PX', ttl)
  end
end
if not admitted then
  return 0
end
local value = 1
if KEYS[3] then
  local keep
  value, keep = draw_fence(KEYS[3], time, ttl)
  if not value then
    return keep
  end
  keep()
end
if tag == 'w' then
  redis.call('del', claim)
end
local expiry = string.format('%.0f', now + ttl)
redis.call('zadd', key, 0, marker, expiry, tag .. token)
-- The key expires with its latest holder: a new set with this one, a set with holders only if
-- this one outlives them all (GT: never shortened).
if kind == 'none' then
  redis.call('pexpireat', key, expiry)
else
  redis.call('pexpireat', key, expiry, 'GT')
end
return value
