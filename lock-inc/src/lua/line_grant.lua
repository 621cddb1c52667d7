-- The hand-over of a fair INCR lock, after lock-core's raw/redis/line.lua and fence.lua (KEYS:
-- counter, owner, fencing counter, then the line's two keys). When the lock is released with
-- waiters in line, it is not left free: the release takes it for the head of the line (the
-- owner is RESERVED .. member, both keys expiring with the head's own entry, a fencing token
-- drawn as acquire.lua draws one) and wakes the head alone with `<waiter>:<expiry>:<fence>`.
-- A newcomer finds the lock held and lines up. The head holds the lock as it is (the
-- reservation is its token, see lock-inc's `claim_grant`) or, when it cannot vouch for the
-- grant, asks: its attempt takes the lock over (line_take_grant). A head that leaves the line
-- gives the lock up first (line_grant_leave), and one that died holds it no longer than its
-- entry lives.
local RESERVED = 'lock-turn-reserved:'

-- When `counter` is free and someone is in line, the lock goes to the head of the line, which
-- alone is woken; a head with no time left on its entry (or a fencing counter that cannot
-- draw) is only woken, to ask.
local function line_grant(counter, owner, fence_key, prefix)
  if redis.call('exists', LINE_EXPIRY) == 0 then
    return
  end
  if redis.call('exists', counter) == 0 then
    local now = line_clock()
    line_prune(now)
    local head = redis.call('zrange', LINE, 0, 0)[1]
    if head then
      local expiry = tonumber(redis.call('zscore', LINE_EXPIRY, head))
      local message = string.sub(head, 33)
      local stored = fence_stored(fence_key)
      local fence = stored and fence_next(stored)
      if expiry - now > 0 and fence then
        local left = string.format('%.0f', expiry - now)
        redis.call('set', counter, '1', 'PX', left)
        redis.call('set', owner, RESERVED .. head, 'PX', left)
        fence_store(fence_key, fence, left)
        message = message .. ':' .. string.format('%.0f', expiry) .. ':' .. string.format('%.0f', fence)
      end
      line_publish(prefix .. string.sub(head, 1, 32), message)
    end
  end
  line_settle()
end

-- `member` ('' for none) leaves the line; the lock given to it is given up first, so that the
-- turn passes on.
local function line_grant_leave(counter, owner, member)
  if member ~= '' then
    if redis.pcall('get', owner) == RESERVED .. member then
      redis.call('del', counter, owner)
    end
    line_leave(member)
  end
end

-- When the lock was given to `member`, `token` takes it over for `ttl` ms (the fencing token
-- drawn for the grant is its own), and the member leaves the line: returns that fencing token
-- (or the error reply of a fencing counter that holds no integer, nothing written). Nil when
-- the lock is not reserved for `member`.
local function line_take_grant(counter, owner, fence_key, token, member, ttl)
  if member == '' or redis.pcall('get', owner) ~= RESERVED .. member then
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
  elseif redis.call('pttl', fence_key) < tonumber(ttl) then
    redis.call('pexpire', fence_key, ttl)
  end
  redis.call('set', owner, token, 'PX', ttl)
  redis.call('pexpire', counter, ttl)
  line_leave(member)
  line_settle()
  return fence
end
