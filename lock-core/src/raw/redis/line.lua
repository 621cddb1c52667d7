-- The waiting line of a fair lock, prepended to the scripts that take and release one.
--
-- KEYS[#KEYS - 1] is the line: a sorted set of waiters scored by arrival (the server's clock in
-- µs, kept strictly increasing), or by a place the client chose (lines on several servers that
-- must agree on their order: every server then scores a waiter alike, and ties go by member);
-- KEYS[#KEYS] holds the same waiters scored by the expiry of
-- their entry (the server's clock in ms plus the lease), renewed by each of their attempts. A
-- member is the 32 hex digits of the waiting client's instance (it listens on the channel
-- <prefix><instance>) followed by the waiter's id. Expired entries are dropped by the next join
-- (and by a release that finds the head lapsed); both keys expire never before an entry still in
-- line and at most a quarter of its lease after the latest entry a join renewed (a join that
-- would outlive them sets them that far past its own entry, so that the joins of a busy line
-- seldom touch them), and are deleted when the line empties, so nothing stays once nobody waits.
local LINE, LINE_EXPIRY = KEYS[#KEYS - 1], KEYS[#KEYS]

-- The value of a key given to the head of the line as the turn passes (see line_give),
-- followed by the head's member (lock-core's `raw::redis::RESERVED`): no token begins with it.
local LINE_RESERVED = 'lock-turn-reserved:'

-- The server's clock in ms and in µs.
local function line_clock()
  local t = redis.call('time')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
    tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Drops the entries whose expiry has passed (each entry is dropped once: O(1) amortized).
local function line_prune(now)
  local gone = redis.call('zrangebyscore', LINE_EXPIRY, '-inf', now)
  for i = 1, #gone do
    redis.call('zrem', LINE, gone[i])
    redis.call('zrem', LINE_EXPIRY, gone[i])
  end
end

-- Deletes the line when it is empty, else makes it expire with its latest entry.
local function line_settle()
  local last = redis.call('zrange', LINE_EXPIRY, -1, -1, 'withscores')
  if not last[2] then
    redis.call('del', LINE, LINE_EXPIRY)
  else
    redis.call('pexpireat', LINE, last[2])
    redis.call('pexpireat', LINE_EXPIRY, last[2])
  end
end

-- Puts `member` at the end of the line (or at `chosen`, a place the client chose, when given),
-- or keeps its place; either way its entry now expires `lease` ms from now. Returns that expiry
-- (the server's clock in ms). When the line's keys would expire before that entry (or one of
-- them has no expiry: it was just made), both are set to expire a quarter of `lease` after it,
-- or with the latest entry of the index when that is later.
local function line_join(member, now, now_us, lease, chosen)
  local expiry = now + lease
  local last = redis.call('zrange', LINE, -1, -1, 'withscores')
  local place = tonumber(chosen)
  if not place then
    place = now_us
    if last[2] and tonumber(last[2]) >= place then
      place = tonumber(last[2]) + 1
    end
  end
  redis.call('zadd', LINE, 'NX', string.format('%.0f', place), member)
  redis.call('zadd', LINE_EXPIRY, string.format('%.0f', expiry), member)
  -- An empty line (`last`) had no LINE key: the ZADD made it, without an expiry. PEXPIRETIME is
  -- Redis 7's: an older server answers an error, and the keys are set at every join.
  local kept = redis.pcall('pexpiretime', LINE_EXPIRY)
  if not last[1] or type(kept) ~= 'number' or kept < expiry then
    local until_ms = expiry + math.ceil(lease / 4)
    -- Known past every other entry only when the index kept an expiry (it is never before
    -- one): without PEXPIRETIME, or a LINE key made anew beside an index (LINE evicted under
    -- `maxmemory`), or an index without one, the index may hold a longer entry than this one.
    if not last[1] or type(kept) ~= 'number' or kept < 0 then
      local latest = redis.call('zrange', LINE_EXPIRY, -1, -1, 'withscores')[2]
      if latest and tonumber(latest) > until_ms then
        until_ms = tonumber(latest)
      end
    end
    until_ms = string.format('%.0f', until_ms)
    redis.call('pexpireat', LINE, until_ms)
    redis.call('pexpireat', LINE_EXPIRY, until_ms)
  end
  return expiry
end

-- Takes `member` out of the line.
local function line_leave(member)
  redis.call('zrem', LINE, member)
  redis.call('zrem', LINE_EXPIRY, member)
end

-- Publishes a waiter's wake-up (also for the backends' own hand-overs). A message the server
-- refuses (an ACL user without pub/sub channels, Redis 7's default for new users) is a lost
-- message, which costs the waiter its fallback poll, not the caller's release or attempt.
local function line_publish(channel, message)
  redis.pcall('publish', channel, message)
end

-- The head of the line and its entry's expiry (nil when nobody waits). A waiter without an
-- expiry (its entry in LINE_EXPIRY gone: that key evicted under `maxmemory`, both carrying a
-- ttl) is dropped on the way: no prune would ever drop it, and it would head the line for good
-- (a live one rejoins at its next attempt).
local function line_head()
  while true do
    local head = redis.call('zrange', LINE, 0, 0)[1]
    if not head then
      return nil
    end
    local expiry = redis.call('zscore', LINE_EXPIRY, head)
    if expiry then
      return head, tonumber(expiry)
    end
    redis.call('zrem', LINE, head)
  end
end

-- Wakes the head of the line alone: one message on its client's channel, naming it.
local function line_wake(prefix)
  local head = line_head()
  if head then
    line_publish(prefix .. string.sub(head, 1, 32), string.sub(head, 33))
  end
end

-- The gate in front of an acquisition of `lock` (whose holder's token is the value of `owner`)
-- by `token`, for the waiter `member` ('' for a single try, which never joins the line), who
-- joins at the place `chosen` when given (see line_join).
-- Returns nil when the attempt may go on: the lock is free (or already held by `token`: a
-- replay) and the line is empty or headed by `member`, which then leaves it. Otherwise the
-- answer to return: 0 when refused (the waiter is in line, not first; a single try never
-- passes a live line), or -(1 + ms) when the waiter is first in line behind a holder with ms
-- left to live. A free lock whose line is headed by another waiter wakes that waiter. A refused
-- waiter's entry expiry (see line_join) comes as a second value, and its place in line behind
-- the holder (1: second) as a third when it was refused for that lock. `gated`: the caller made the
-- first test below itself, found someone in line or the lock held, and wrote nothing since.
-- `held_by`, when given: the value of `owner` as the caller read it with `redis.pcall('get')`,
-- nothing written to it since. `tell_from`, when given: the first place worth telling (a client
-- that would not defer a waiter closer to the head asks for none of theirs; see lock-core's
-- `TurnRegistry::tell_place_from`).
local function line_gate(lock, owner, token, member, lease, prefix, chosen, gated, held_by, tell_from)
  -- Whether `lock` is there: what the read of it said, when `owner` is `lock` itself (a key of
  -- another type reads as an error, which is there too).
  local function held()
    if lock == owner and held_by ~= nil then
      return held_by ~= false
    end
    return redis.call('exists', lock) == 1
  end
  -- Nobody in line (the uncontended case): only the lock decides.
  if not gated and (member == '' or not held())
    and redis.call('exists', LINE_EXPIRY) == 0 then
    return nil
  end
  local now, now_us = line_clock()
  line_prune(now)
  if held_by == nil then
    held_by = redis.pcall('get', owner)
  end
  if held_by == token then
    return nil
  end
  if held() then
    if member == '' then
      return 0
    end
    local expiry = line_join(member, now, now_us, lease, chosen)
    local rank = redis.call('zrank', LINE, member)
    -- A head the key is reserved for may hold it as its lock (one-node Redlock's grant, see
    -- lock-redlock's line_pass.lua) and stays in line until it releases or its entry lapses
    -- with the key: the waiter behind it is then first behind that holder.
    if rank == 1 and held_by == LINE_RESERVED .. redis.call('zrange', LINE, 0, 0)[1] then
      rank = 0
    end
    if rank == 0 then
      local left = redis.call('pttl', lock)
      if left < 0 then
        left = 0
      end
      return -(1 + left), expiry
    end
    -- A waiter told its place answers its own polls until its place's hand-offs could have
    -- passed, a quarter of its lease at most (10 s: lock-core's `behind_at_most`); each
    -- hand-off is announced, but a lapse is not: the lock's (a holder that died; a dead
    -- head's reservation), or entries' in line (waiters that died), may leave the key free
    -- for it at once, after those ahead gave up without a word. The place is told only when
    -- nothing lapses before that cap: otherwise the waiter polls, and finds the key by its poll.
    -- A place the client would not defer for is not looked into at all.
    if tell_from and rank < tell_from then
      return 0, expiry
    end
    local cap = math.min(lease / 4, 10000)
    local left = redis.call('pttl', lock)
    if left >= 0 and left < cap then
      return 0, expiry
    end
    local soonest = redis.call('zrange', LINE_EXPIRY, 0, 0, 'withscores')[2]
    if soonest and tonumber(soonest) - now < cap then
      return 0, expiry
    end
    return 0, expiry, rank
  end
  local head = line_head()
  if not head then
    return nil
  end
  if head == member then
    line_leave(member)
    line_settle()
    return nil
  end
  local expiry
  if member ~= '' then
    expiry = line_join(member, now, now_us, lease, chosen)
  end
  line_wake(prefix)
  return 0, expiry
end

-- When `lock` is free, the turn passes to the head of the line, which alone is woken. With
-- time left on the head's entry, `give(head, left, now_us)` first takes the key for the head,
-- for `left` ms (a string; `now_us` is the server's clock in µs as read here): what it returns
-- (nil when it gave nothing) follows the entry's expiry in the message,
-- `<waiter>:<expiry><what give returned>`, so that a waiter whose latest attempt renewed its
-- entry to exactly that expiry knows when what it was given lapses, and may hold it as it is
-- without asking again. `free`: the caller deleted `lock` in this script and nothing wrote it
-- since (a release that was the holder's), so it is not asked again.
local function line_give(lock, prefix, give, free)
  if redis.call('exists', LINE_EXPIRY) == 0 then
    return
  end
  if free or redis.call('exists', lock) == 0 then
    local now, now_us = line_clock()
    -- Lapsed entries are dropped only when the head found has lapsed: the first live entry is
    -- the head either way.
    local head, expiry = line_head()
    if head and expiry <= now then
      line_prune(now)
      head, expiry = line_head()
    end
    if head then
      local message = string.sub(head, 33)
      if expiry - now > 0 then
        local given = give(head, string.format('%.0f', expiry - now), now_us)
        if given then
          message = message .. ':' .. string.format('%.0f', expiry) .. given
        end
      end
      line_publish(prefix .. string.sub(head, 1, 32), message)
      -- The line is not empty: its keys, settled by every join, expire no earlier than any
      -- entry (at most one lease later than the latest, once that one left).
      return
    end
  end
  line_settle()
end

-- `member` ('' for none) leaves the line; what was given to it (`owner` holds LINE_RESERVED
-- and the member) is given up first, the keys `...` deleted, so that the turn passes on.
local function line_give_back(owner, member, ...)
  if member ~= '' then
    if redis.pcall('get', owner) == LINE_RESERVED .. member then
      redis.call('del', ...)
    end
    line_leave(member)
  end
end
