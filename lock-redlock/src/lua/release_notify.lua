-- As release.lua, and announces each release on the channel ARGV[2] .. key, so that waiters
-- subscribed to it retry at once instead of sleeping out their retry delay.
local deleted = 0
for i = 1, #KEYS do
  if redis.pcall('get', KEYS[i]) == ARGV[1] then
    deleted = deleted + redis.call('del', KEYS[i])
    redis.pcall('publish', ARGV[2] .. KEYS[i], '1')
  end
end
return deleted
