-- The fencing counter of a lock (its third key), prepended to the scripts that draw tokens:
-- acquire.lua and the fair hand-over (line_grant.lua). Tokens are exact integers only below
-- 2^53 (Lua numbers are doubles): a counter that is not such an integer, or a token that would
-- reach 2^53, is an error found before anything is written, never a token handed out twice.
-- Comes first in the acquisitions, whose writes follow the clock (`TIME`): effects are
-- replicated, not the script (the default from Redis 5 on).
if redis.replicate_commands then
  redis.replicate_commands()
end
local FENCE_LARGEST = 9007199254740991

-- The counter stored at `key` (0 when absent) and whether one is stored; nil and the error
-- reply when it holds no integer below 2^53.
local function fence_stored(key)
  local stored = redis.call('get', key)
  if not stored then
    return 0, false
  end
  local counter = tonumber(stored)
  if not counter or counter ~= math.floor(counter) or counter < 0 or counter >= FENCE_LARGEST then
    return nil, redis.error_reply('ERR the fencing counter holds no integer below 2^53')
  end
  return counter, true
end

-- The next fencing token after `counter`: the counter + 1, but never below the server's clock
-- in microseconds (`clock`, when the caller read it in this script already), so that a server
-- that restarted without its data still hands out higher tokens. Nil and the error reply when
-- it would reach 2^53.
local function fence_next(counter, clock)
  if not clock then
    local now = redis.call('time')
    clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
  end
  local fence = math.max(counter + 1, clock)
  if fence >= FENCE_LARGEST then
    return nil, redis.error_reply('ERR the fencing token would reach 2^53 (is the server clock far ahead?)')
  end
  return fence
end

-- Stores `fence` at `key` for a lock held `ttl` ms. The counter expires (so that locking ever
-- new keys leaves nothing behind) only once the server's clock has passed the token it holds:
-- a key is gone only when the clock in ms is above its expiry time, so from then on the clock
-- in µs is above `fence`, and the next token, at least the clock, is higher. At least the
-- lock's ttl from now (`fence` >= the clock), so that a replay finds its token.
local function fence_store(key, fence, ttl)
  redis.call('set', key, string.format('%.0f', fence), 'PXAT',
    string.format('%.0f', math.floor(fence / 1000) + 1 + tonumber(ttl)))
end
