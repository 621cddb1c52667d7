-- The hand-over of a fair Redlock mutex (one node), prepended after lock-core's
-- raw/redis/line.lua. When the lock is released with waiters in line, the key is not left free:
-- it is set to a reservation naming the head of the line (RESERVED .. member), which expires
-- with the head's own entry, and the head alone is woken. A newcomer's plain `SET NX` (the
-- first attempt of every acquisition, cheap when nobody waits) finds the key taken and lines
-- up; the head's next attempt (acquire_fair.lua) turns its reservation into the lock, or, on one
-- node, the head holds the reservation itself as its lock (see line_pass's message). A head
-- that leaves the line gives its reservation up to the next (line_pass_from), and one that died
-- holds the key no longer than its entry lives.
local RESERVED = LINE_RESERVED

-- The turn passes to the head of the line when `lock` is free: the key is reserved for it
-- until its entry expires, and it is woken (with the reservation's expiry, see line_give,
-- which also says what `free` is).
local function line_pass(lock, prefix, free)
  line_give(lock, prefix, function(head, left)
    redis.call('set', lock, RESERVED .. head, 'PX', left)
    return ''
  end, free)
end

-- `member` leaves the line; a reservation of `lock` for it is given up first, so that the turn
-- passes on.
local function line_pass_from(lock, member, prefix)
  line_give_back(lock, member, lock)
  line_pass(lock, prefix)
end

-- True when `lock` is reserved for `member`, whose turn it is: the reservation is removed and
-- the member leaves the line, so that the caller takes the lock. `held_by`: the value of `lock`
-- as `redis.pcall('get')` read it (nil for a single try, `member` '').
local function line_take_turn(lock, member, held_by)
  if member == '' or held_by ~= RESERVED .. member then
    return false
  end
  redis.call('del', lock)
  line_leave(member)
  line_settle()
  return true
end
