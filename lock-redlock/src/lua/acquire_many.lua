-- Takes every key in KEYS for the token ARGV[1] with a ttl of ARGV[2] ms, or none of them.
-- Returns 1 when all were free and are now ours, 0 when any was held.
for i = 1, #KEYS do
  if redis.call('exists', KEYS[i]) == 1 then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('set', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return 1
