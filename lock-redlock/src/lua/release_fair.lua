-- Releases the fair lock KEYS[1] held by the token ARGV[1] (compare-and-delete), takes the
-- waiter ARGV[2] ('' for none) out of its line (KEYS[2], KEYS[3]), giving up the key's
-- reservation if it was that waiter's, and when the lock is free reserves it for the head of
-- the line, woken alone on its channel (prefix ARGV[3]). ARGV[4], when given, is the channel
-- prefix of `wake_on_release`, announced on as release_notify.lua does. Returns how many keys
-- were deleted (0 or 1). This part comes first and returns when nobody is in line (the
-- uncontended case), before the line's helpers are defined (lock-core's raw/redis/line.lua,
-- line_pass.lua and release_fair_pass.lua follow it): defining them is most of a short
-- script's cost.
local deleted = 0
if redis.pcall('get', KEYS[1]) == ARGV[1] then
  deleted = redis.call('del', KEYS[1])
  if ARGV[4] then
    redis.pcall('publish', ARGV[4] .. KEYS[1], '1')
  end
end
if ARGV[2] == '' and redis.call('exists', KEYS[3]) == 0 then
  return deleted
end
