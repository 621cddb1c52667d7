-- Raises the fencing counter KEYS[2] to at least ARGV[2] (it never goes down), so that every
-- later acquisition on this node counts past it. Returns 1 when the lock KEYS[1] still holds
-- the token ARGV[1], 0 otherwise (the counter is raised either way).
local current = tonumber(redis.call('get', KEYS[2]) or '0')
if current < tonumber(ARGV[2]) then
  redis.call('set', KEYS[2], ARGV[2])
end
if redis.call('get', KEYS[1]) == ARGV[1] then
  return 1
end
return 0
