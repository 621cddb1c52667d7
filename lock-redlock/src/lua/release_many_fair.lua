-- Releases a multi-key lock on a fair node: KEYS are, for each key of the lock, the key, its
-- line and its line's expiries (three per key, in the lock's key order). Deletes each key
-- still held by the token ARGV[1] (compare-and-delete); ARGV[3], when given, is the channel
-- prefix of `wake_on_release`, announced on as release_notify.lua does. A multi-key lock is
-- not lined up, but single-key waiters may be in line behind it: each key it freed that has a
-- line passes the turn to its head (reserved for it, and woken on its channel, prefix
-- ARGV[2]). Returns how many keys were deleted. This part comes first and returns when no
-- freed key has a line (the uncontended case), before the line's helpers are defined
-- (lock-core's raw/redis/line.lua, line_pass.lua and release_many_fair_pass.lua follow it).
local deleted = 0
local freed = {}
for i = 1, #KEYS, 3 do
  if redis.pcall('get', KEYS[i]) == ARGV[1] then
    deleted = deleted + redis.call('del', KEYS[i])
    if ARGV[3] then
      redis.pcall('publish', ARGV[3] .. KEYS[i], '1')
    end
    if redis.call('exists', KEYS[i + 2]) == 1 then
      freed[#freed + 1] = i
    end
  end
end
if #freed == 0 then
  return deleted
end
