-- Sets a new ttl only for the holder. KEYS[1]: counter, KEYS[2]: owner; ARGV[1]: token,
-- ARGV[2]: ttl in ms. Returns 1 when extended, 0 when the lock was not ours.
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  redis.call('pexpire', KEYS[2], ARGV[2])
  return 1
end
return 0
