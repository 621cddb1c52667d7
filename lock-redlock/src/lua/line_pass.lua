-- The hand-over of a fair Redlock mutex (one node), prepended after lock-core's
-- raw/redis/line.lua. When the lock is released with waiters in line, the key is not left free:
-- it is set to a reservation naming the head of the line (RESERVED .. member), which expires
-- with the head's own entry, and the head alone is woken. A newcomer's plain `SET NX` (the
-- first attempt of every acquisition, cheap when nobody waits) finds the key taken and lines
-- up; the head's next attempt (acquire_fair.lua) turns its reservation into the lock, or, on one
-- node, the head holds the reservation itself as its lock (see line_pass's message). A head
-- that leaves the line gives its reservation up to the next (line_pass_from), and one that died
-- holds the key no longer than its entry lives.
local RESERVED = 'lock-turn-reserved:'

-- The turn passes to the head of the line when `lock` is free: the key is reserved for it
-- until its entry expires, and it is woken.
local function line_pass(lock, prefix)
  if redis.call('exists', LINE_EXPIRY) == 0 then
    return
  end
  if redis.call('exists', lock) == 0 then
    local now = line_clock()
    line_prune(now)
    local head = redis.call('zrange', LINE, 0, 0)[1]
    if head then
      local expiry = tonumber(redis.call('zscore', LINE_EXPIRY, head))
      local message = string.sub(head, 33)
      if expiry - now > 0 then
        redis.call('set', lock, RESERVED .. head, 'PX', string.format('%.0f', expiry - now))
        -- The reservation's expiry rides along: a waiter whose latest attempt renewed its entry
        -- to exactly that expiry knows when the key it was given lapses, and may hold it as it
        -- is (the reservation is then its lock), without asking again.
        message = message .. ':' .. string.format('%.0f', expiry)
      end
      line_publish(prefix .. string.sub(head, 1, 32), message)
    end
  end
  line_settle()
end

-- `member` leaves the line; a reservation of `lock` for it is given up first, so that the turn
-- passes on.
local function line_pass_from(lock, member, prefix)
  if member ~= '' then
    if redis.pcall('get', lock) == RESERVED .. member then
      redis.call('del', lock)
    end
    line_leave(member)
  end
  line_pass(lock, prefix)
end

-- True when `lock` is reserved for `member`, whose turn it is: the reservation is removed and
-- the member leaves the line, so that the caller takes the lock.
local function line_take_turn(lock, member)
  if member == '' or redis.pcall('get', lock) ~= RESERVED .. member then
    return false
  end
  redis.call('del', lock)
  line_leave(member)
  line_settle()
  return true
end
