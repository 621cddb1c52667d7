-- Deletes the lock only for its holder. KEYS[1]: counter, KEYS[2]: owner; ARGV[1]: token.
-- Returns 1 when released, 0 when the lock was not (or no longer) ours.
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2])
  return 1
end
return 0
