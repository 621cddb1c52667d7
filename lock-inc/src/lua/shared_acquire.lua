-- One attempt at a semaphore permit, a read lock or a write lock. KEYS[1]: the holder set (a
-- sorted set: member = kind letter + token, score = the first millisecond of the server's clock
-- in which the holder is gone), KEYS[2]: the kind marker, KEYS[3]: the fencing counter (the
-- mutex's, same rule).
-- ARGV[1]: token, ARGV[2]: ttl in ms, ARGV[3]: 'p' (permit), 'r' (read) or 'w' (write),
-- ARGV[4]: for 'p' the semaphore's size, for 'w' '1' when the writer will wait.
-- Returns the new fencing token when admitted, 0 when the key is held, or the marker (a string)
-- naming what the key is used as when it is another kind of lock.
--
-- A holder's score is the first millisecond of the server's clock in which it is gone: the clock
-- read in whole milliseconds (rounded down) plus the ttl plus one, since the prune below removes
-- every holder whose score is at or before the clock. Old: `now + ttl`, which the prune took
-- for gone from `floor(t) + ttl`, up to a millisecond before `t + ttl`: the holder's validity
-- (its send time plus the ttl) outlasted its entry, and the next writer got in while it still
-- counted itself valid (`tests/tests/attack_s31b.rs`).
--
-- The marker is `#p:<size>` for a semaphore, `#rw` for a read-write lock, and
-- `#rw:<token>:<expiry ms>` while a waiting writer's claim keeps new readers out (a token read
-- back from a store may be any text, `:` included: the expiry follows the last `:`). A mutex
-- keeps its holder's token (hex, never `#…`) under the same name.
if redis.replicate_commands then
  redis.replicate_commands()
end
local largest = 9007199254740991
local token, ttl, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local member = mode .. token
local time = redis.call('time')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local clock = tonumber(time[1]) * 1000000 + tonumber(time[2])
local asked = '#rw'
if mode == 'p' then
  asked = '#p:' .. ARGV[4]
end

local marker = redis.call('get', KEYS[2])
local kind = redis.call('type', KEYS[1]).ok
if kind == 'string' or (marker and string.sub(marker, 1, 1) ~= '#') then
  return 'mutex'
end
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply('ERR the lock key holds a ' .. kind .. ', not a lock')
end
-- Holders whose time has passed, by the server's clock: reclaimed here, no sweeper.
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
local count = redis.call('zcard', KEYS[1])
local claim, claim_until = nil, 0
if marker then
  local claimant, expiry = string.match(marker, '^#rw:(.+):(%d+)$')
  if claimant and tonumber(expiry) > now then
    claim, claim_until = claimant, tonumber(expiry)
  end
  local family = marker
  if string.sub(marker, 1, 3) == '#rw' then
    family = '#rw'
  end
  if family ~= asked and (count > 0 or claim) then
    return family
  end
end

local replay = redis.call('zscore', KEYS[1], member)
local admitted = replay ~= false
if not admitted then
  if mode == 'p' then
    admitted = count < tonumber(ARGV[4])
  elseif mode == 'r' then
    local writing = false
    if count == 1 then
      writing = string.sub(redis.call('zrange', KEYS[1], 0, 0)[1], 1, 1) == 'w'
    end
    admitted = not claim and not writing
  else
    admitted = count == 0
    if not admitted and ARGV[4] == '1' then
      -- Writer preference: keep new readers out until this writer gets in, stops waiting
      -- (takes the claim back by token) or the claim's ttl passes.
      claim, claim_until = token, now + ttl
    end
  end
end

local fence = 0
if admitted then
  local stored = redis.call('get', KEYS[3])
  local counter = 0
  if stored then
    counter = tonumber(stored)
    if not counter or counter ~= math.floor(counter) or counter < 0 or counter >= largest then
      return redis.error_reply('ERR the fencing counter holds no integer below 2^53')
    end
  end
  fence = math.max(counter + 1, clock)
  if fence >= largest then
    return redis.error_reply('ERR the fencing token would reach 2^53 (is the server clock far ahead?)')
  end
  if not replay then
    -- Scored with the first millisecond in which the holder is gone (see above).
    redis.call('zadd', KEYS[1], now + ttl + 1, member)
    if mode == 'w' then
      claim, claim_until = nil, 0
    end
  end
  redis.call('set', KEYS[3], string.format('%.0f', fence))
  redis.call('pexpireat', KEYS[3],
    string.format('%.0f', math.floor(fence / 1000) + 1 + ttl))
elseif mode ~= 'w' or ARGV[4] ~= '1' then
  -- Held, and nothing to leave: the expiries set by the last change still stand.
  return 0
end

-- The set and its marker expire with the latest holder (the marker with a claim, if later).
local latest = 0
local last = redis.call('zrange', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  latest = tonumber(last[2])
  redis.call('pexpireat', KEYS[1], string.format('%.0f', latest))
end
if claim then
  asked = '#rw:' .. claim .. ':' .. string.format('%.0f', claim_until)
end
redis.call('set', KEYS[2], asked, 'PXAT', string.format('%.0f', math.max(latest, claim_until)))
return fence
