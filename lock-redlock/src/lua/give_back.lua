-- A fair waiter's plain first attempt (node.rs `acquire_fair_plain`) set the key KEYS[1] for
-- the token ARGV[1] and found a waiting line (KEYS[2], KEYS[3]): it gives the key back, which
-- passes it to the head of the line (a reservation, the head woken on its channel, prefix
-- ARGV[3]) as a release does, and takes it again for ARGV[2] ms when the pass left it free
-- (nobody live in line: a line of lapsed entries only, pruned by the pass, its keys deleted).
-- Only while the first write is still there: a release of the same token that deleted it
-- meanwhile (sent by the caller once a quorum of other nodes had answered) must find nothing of
-- ours written after it on this node. Returns 1 when the key is ours again, else 0. The
-- line's helpers (lock-core's raw/redis/line.lua and line_pass.lua) come before this part.
if redis.pcall('get', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('del', KEYS[1])
line_pass(KEYS[1], ARGV[3], true)
if redis.call('exists', KEYS[1]) == 1 then
  return 0
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
