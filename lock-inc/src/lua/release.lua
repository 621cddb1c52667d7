-- Deletes the lock only for its holder. KEYS[1]: counter, KEYS[2]: owner; ARGV[1]: token,
-- ARGV[2] (optional): a channel on which to announce the release to waiters.
-- Returns 1 when released, 0 when the lock was not (or no longer) ours.
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2])
  if ARGV[2] then
    redis.pcall('publish', ARGV[2], '1')
  end
  return 1
end
return 0
