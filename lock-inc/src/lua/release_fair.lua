-- Releases the fair lock (KEYS[1] counter, KEYS[2] owner, KEYS[3] fencing counter) held by the
-- token ARGV[1], takes the waiter ARGV[2] ('' for none) out of its line (KEYS[4], KEYS[5]), and
-- when the lock is free gives it to the head of the line, woken alone on its channel (prefix
-- ARGV[3]; see line_grant.lua).
-- ARGV[4], when given, is the `wake_on_release` channel, announced on as release.lua does.
-- Returns 1 when released, 0 when the lock was not (or no longer) ours. This part comes first
-- and returns when nobody is in line (the uncontended case), before the line's helpers are
-- defined (lock-core's raw/redis/line.lua, fence.lua, line_grant.lua and release_fair_pass.lua
-- follow it): defining them is most of a short script's cost.
local released = 0
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2])
  if ARGV[4] then
    redis.pcall('publish', ARGV[4], '1')
  end
  released = 1
end
if ARGV[2] == '' and redis.call('exists', KEYS[#KEYS]) == 0 then
  return released
end
