-- One INCR-based attempt. KEYS[1]: the lock counter, KEYS[2]: its owner token,
-- KEYS[3]: the fencing counter. ARGV[1]: token, ARGV[2]: ttl in ms.
-- Returns the new fencing token when the lock is ours, 0 when the resource is locked.
-- Tokens are exact integers only below 2^53 (Lua numbers are doubles): a fencing counter that
-- is not such an integer, or a token that would reach 2^53, is an error raised before anything
-- is written, never a token handed out twice.
if redis.replicate_commands then
  redis.replicate_commands()
end
local largest = 9007199254740991
local stored = redis.call('get', KEYS[3])
local counter = 0
if stored then
  counter = tonumber(stored)
  if not counter or counter ~= math.floor(counter) or counter < 0 or counter >= largest then
    return redis.error_reply('ERR the fencing counter holds no integer below 2^53')
  end
end
local owner = redis.call('get', KEYS[2])
if owner and string.byte(owner) == 35 then
  -- `#…`: the key is in use as a semaphore or a read-write lock (shared_acquire.lua): held.
  return 0
end
local replay = owner == ARGV[1]
if replay and stored then
  -- The same attempt again (a client replayed it after a reconnect): it already won, and its
  -- fencing token is still stored (the fencing counter outlives the first ttl of the lock).
  return counter
end
-- The fencing token: the counter + 1, but never below the server's clock in microseconds, so
-- that a server that restarted without its data still hands out higher tokens. (A replay whose
-- counter is gone — the lock was extended past it, or the key deleted — gets a new token, higher
-- than the lost one all the same; never 0: the lock is ours.)
local now = redis.call('time')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local fence = math.max(counter + 1, clock)
if fence >= largest then
  return redis.error_reply('ERR the fencing token would reach 2^53 (is the server clock far ahead?)')
end
if not replay then
  local count = redis.pcall('incr', KEYS[1])
  if type(count) == 'table' then
    -- WRONGTYPE: a holder set of a semaphore or read-write lock is held; anything else is bad
    -- state, reported as the error it is.
    if redis.call('type', KEYS[1]).ok == 'zset' then
      return 0
    end
    return count
  end
  if count ~= 1 then
    return 0
  end
  -- The expiry is set in the same script as the INCR: no crash can leave an immortal lock.
  redis.call('pexpire', KEYS[1], ARGV[2])
  redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
redis.call('set', KEYS[3], string.format('%.0f', fence))
-- The fencing counter expires (so that locking ever new keys leaves nothing behind) only once
-- the server's clock has passed the token it holds: a key is gone only when the clock in ms is
-- above its expiry time, so from then on the clock in µs is above `fence`, and the next
-- token, at least the clock, is higher. At least the lock's ttl from now (`fence` >= `clock`),
-- so that a replay finds its token.
redis.call('pexpireat', KEYS[3],
  string.format('%.0f', math.floor(fence / 1000) + 1 + tonumber(ARGV[2])))
return fence
