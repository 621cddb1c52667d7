-- Raises the fencing counters KEYS[n+1..2n] to at least ARGV[2] (they never go down), where
-- n = #KEYS / 2, so that every later acquisition of any of the locks KEYS[1..n] on this node
-- counts past it; a raised counter is kept until this server's clock has passed the value plus
-- the ttl ARGV[3] (ms). Returns 1 when every lock still holds the token ARGV[1], 0 otherwise
-- (the counters are raised either way). A counter that holds no integer below 2^53 is left
-- alone: the next acquisition of its key reports it.
if redis.replicate_commands then
  redis.replicate_commands()
end
local n = #KEYS / 2
local value = tonumber(ARGV[2])
local now = redis.call('time')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local keep = tonumber(ARGV[3]) + math.max(0, math.ceil((value - clock) / 1000))
for i = n + 1, 2 * n do
  local stored = redis.call('get', KEYS[i])
  if not stored or (tonumber(stored) and tonumber(stored) < value) then
    redis.call('set', KEYS[i], ARGV[2], 'PX', keep)
  end
end
for i = 1, n do
  if redis.pcall('get', KEYS[i]) ~= ARGV[1] then
    return 0
  end
end
return 1
