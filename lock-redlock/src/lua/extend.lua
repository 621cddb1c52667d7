-- Sets the ttl of every key in KEYS to ARGV[2] ms, only if each still holds the token ARGV[1]
-- (compare-and-pexpire). Returns 1 when extended, 0 when any key was lost.
for i = 1, #KEYS do
  if redis.pcall('get', KEYS[i]) ~= ARGV[1] then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('pexpire', KEYS[i], ARGV[2])
end
return 1
