-- One INCR-based attempt. KEYS[1]: the lock counter, KEYS[2]: its owner token,
-- KEYS[3]: the fencing counter (never expires). ARGV[1]: token, ARGV[2]: ttl in ms.
-- Returns the new fencing token when the lock is ours, 0 when the resource is locked.
if redis.call('get', KEYS[2]) == ARGV[1] then
  -- The same attempt again (a client replayed it after a reconnect): it already won.
  return tonumber(redis.call('get', KEYS[3]) or '0')
end
if redis.call('incr', KEYS[1]) ~= 1 then
  return 0
end
-- The expiry is set in the same script as the INCR: no crash can leave an immortal lock.
redis.call('pexpire', KEYS[1], ARGV[2])
redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
return redis.call('incr', KEYS[3])
