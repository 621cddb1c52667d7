-- A fair attempt over several nodes took the key KEYS[1] here (its turn, or a free key) for the
-- token ARGV[1] but not on a quorum: the key goes back to being reserved for its waiter ARGV[2],
-- who rejoins the line (KEYS[2], KEYS[3]) at the place ARGV[3] its client chose, with an entry
-- for ARGV[4] ms — unless someone stands before it there now, and then the turn passes to them
-- (line_pass: reserved and woken, on the prefix ARGV[5]). The waiter keeps the turn it was
-- given without being woken for it again: it waits for the other nodes. Prepended:
-- lock-core's raw/redis/line.lua and line_pass.lua. Returns 1 when the key was the token's.
if redis.pcall('get', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('del', KEYS[1])
local now, now_us = line_clock()
line_prune(now)
line_join(ARGV[2], now, now_us, tonumber(ARGV[4]), ARGV[3])
local head, expiry = line_head()
if head == ARGV[2] then
  local left = expiry - now
  if left > 0 then
    redis.call('set', KEYS[1], RESERVED .. ARGV[2], 'PX', string.format('%.0f', left))
  end
  return 1
end
line_pass(KEYS[1], ARGV[5])
return 1
