-- One INCR-based attempt (after fence.lua). KEYS[1]: the lock counter, KEYS[2]: its owner
-- token, KEYS[3]: the fencing counter. ARGV[1]: token, ARGV[2]: ttl in ms.
-- Returns the new fencing token when the lock is ours, 0 when the resource is locked.
local counter, stored = fence_stored(KEYS[3])
if not counter then
  return stored
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
-- (A replay whose counter is gone — the lock was extended past it, or the key deleted — gets a
-- new token, higher than the lost one all the same; never 0: the lock is ours.)
local fence, refused = fence_next(counter)
if not fence then
  return refused
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
fence_store(KEYS[3], fence, ARGV[2])
return fence
