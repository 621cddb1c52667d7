-- Takes every key in KEYS[1..n-1] for the token ARGV[1] with a ttl of ARGV[2] ms, or none of
-- them, and then draws a fencing value from the counter KEYS[n]: the larger of the counter + 1
-- and the server's clock in microseconds, so that a node that restarted empty still hands out
-- values above those it gave before. Returns the value (>= 1) when all keys were free, 0 when
-- any was held.
if redis.replicate_commands then
  redis.replicate_commands()
end
local last = #KEYS - 1
for i = 1, last do
  if redis.call('exists', KEYS[i]) == 1 then
    return 0
  end
end
for i = 1, last do
  redis.call('set', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
local now = redis.call('time')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local value = math.max(tonumber(redis.call('get', KEYS[#KEYS]) or '0') + 1, clock)
redis.call('set', KEYS[#KEYS], string.format('%.0f', value))
return value
