-- Releases the fair lock (KEYS[1] counter, KEYS[2] owner) held by the token ARGV[1], takes the
-- waiter ARGV[2] ('' for none) out of its line (lock-core's raw/redis/line.lua, prepended; KEYS[3], KEYS[4]), and when
-- the lock is free passes the turn to the head of the line, woken alone on its channel (prefix
-- ARGV[3]). ARGV[4], when given, is the `wake_on_release` channel, announced on as release.lua
-- does. Returns 1 when released, 0 when the lock was not (or no longer) ours.
local released = 0
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2])
  if ARGV[4] then
    redis.call('publish', ARGV[4], '1')
  end
  released = 1
end
if ARGV[2] ~= '' then
  line_leave(ARGV[2])
end
line_hand_over(KEYS[1], ARGV[3])
return released
