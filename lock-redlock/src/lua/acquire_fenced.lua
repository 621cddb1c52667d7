-- Takes every key in KEYS[1..n-1] for the token ARGV[1] with a ttl of ARGV[2] ms, or none of
-- them, and then counts one more acquisition on the fencing counter KEYS[n].
-- Returns the counter's new value (>= 1) when all keys were free, 0 when any was held.
local last = #KEYS - 1
for i = 1, last do
  if redis.call('exists', KEYS[i]) == 1 then
    return 0
  end
end
for i = 1, last do
  redis.call('set', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return redis.call('incr', KEYS[#KEYS])
