-- The hand-over of a fair INCR lock, after lock-core's raw/redis/line.lua and fence.lua (KEYS:
-- counter, owner, fencing counter, then the line's two keys). When the lock is released with
-- waiters in line, it is not left free: the release takes it for the head of the line (the
-- owner is RESERVED .. member, both keys expiring with the head's own entry, a fencing token
-- drawn as acquire.lua draws one) and wakes the head alone with `<waiter>:<expiry>:<fence>`.
-- A newcomer finds the lock held and lines up. The head holds the lock as it is (the
-- reservation is its token, see lock-inc's `claim_grant`) or, when it cannot vouch for the
-- grant, asks: its attempt takes the lock over (line_take_grant). A head that leaves the line
-- gives the lock up first (line.lua's line_give_back), and one that died holds it no longer
-- than its entry lives.
local RESERVED = LINE_RESERVED

-- When `counter` is free and someone is in line, the lock goes to the head of the line, which
-- alone is woken (see line_give); a fencing counter that cannot draw (it holds no integer)
-- gives nothing: the head is only woken, to ask, and its attempt reports the error. `free`:
-- see line_give.
local function line_grant(counter, owner, fence_key, prefix, free)
  line_give(counter, prefix, function(head, left, now_us)
    local stored = fence_stored(fence_key)
    local fence = stored and fence_next(stored, now_us)
    if not fence then
      return nil
    end
    redis.call('set', counter, '1', 'PX', left)
    redis.call('set', owner, RESERVED .. head, 'PX', left)
    fence_store(fence_key, fence, left)
    return ':' .. string.format('%.0f', fence)
  end, free)
end

-- When the lock was given to `member`, `token` takes it over for `ttl` ms (the fencing token
-- drawn for the grant is its own), and the member leaves the line: returns that fencing token
-- (or the error reply of a fencing counter that holds no integer, nothing written). Nil when
-- the lock is not reserved for `member`. `held_by`: the value of `owner`, as
-- `redis.pcall('get')` reads it.
local function line_take_grant(counter, owner, fence_key, token, member, ttl, held_by)
  if member == '' or held_by ~= RESERVED .. member then
    return nil
  end
  local fence, stored = fence_stored(fence_key)
  if not fence then
    return stored
  end
  if not stored then
    -- The counter was deleted under the grant: a new token, higher than the grant's all the
    -- same (see fence_next).
    local refused
    fence, refused = fence_next(fence)
    if not fence then
      return refused
    end
    fence_store(fence_key, fence, ttl)
  else
    -- At least the lock's ttl from now, so that a replay finds its token (a counter without an
    -- expiry, written by hand, keeps none).
    local left = redis.call('pttl', fence_key)
    if left >= 0 and left < tonumber(ttl) then
      redis.call('pexpire', fence_key, ttl)
    end
  end
  redis.call('set', owner, token, 'PX', ttl)
  redis.call('pexpire', counter, ttl)
  line_leave(member)
  line_settle()
  return fence
end
