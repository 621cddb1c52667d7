-- Turns a live write lock into a read lock in one step: same expiry (and the fencing token,
-- kept by the holder, is unchanged). KEYS[1]: the holder set. ARGV[1]: token, ARGV[2]
-- (optional): a channel on which to tell waiting readers. Returns 1 when downgraded, 0 when the
-- write lock was not (or no longer) ours.
if redis.replicate_commands then
  redis.replicate_commands()
end
if redis.call('type', KEYS[1]).ok ~= 'zset' then
  return 0
end
local time = redis.call('time')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local score = redis.call('zscore', KEYS[1], 'w' .. ARGV[1])
if not score or tonumber(score) <= now then
  return 0
end
-- The read entry first: removing the writer's entry first would empty the set (a writer holds
-- alone), and Redis deletes an empty sorted set with its expiry; the new set would have none.
redis.call('zadd', KEYS[1], score, 'r' .. ARGV[1])
redis.call('zrem', KEYS[1], 'w' .. ARGV[1])
if ARGV[2] then
  redis.pcall('publish', ARGV[2], '1')
end
return 1
