-- The second round of a fenced lease over several nodes: raises the fencing counter KEYS[2] to
-- ARGV[2] if the token ARGV[1] still holds its lease on KEYS[1] (in the set under a tag of
-- ARGV[3], or the slot ARGV[4] of the hash when ARGV[4] is not empty), kept until the clock
-- passes it plus ARGV[5] ms. ARGV[6] is the value this node drew for the token (0 if none).
-- Leases are shared, so two holders may raise at once: a node says yes only when the value
-- is new to it (the counter is below it) or is its own draw for this token, so no two holders
-- can both raise one value on a quorum (two quorums share a node). Returns 1 when raised and
-- held, 0 when the lease is gone, and minus the counter when held but the value is not new.
if redis.replicate_commands then
  redis.replicate_commands()
end
local key, counter, token, value = KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2])
local now, time = now_ms()
local held = false
if ARGV[4] ~= '' then
  if redis.call('type', key).ok == 'hash' then
    local entry = redis.call('hget', key, ARGV[4])
    if entry then
      local expiry, holder = string.match(entry, '^(%d+) (.*)$')
      held = holder == token and tonumber(expiry) > now
    end
  end
elseif redis.call('type', key).ok == 'string' then
  held = solo_holds(redis.call('get', key), ARGV[3], token)
elseif marker_of(key) then
  local tags = ARGV[3]
  for i = 1, #tags do
    local score = redis.call('zscore', key, string.sub(tags, i, i) .. token)
    if score and tonumber(score) > now then
      held = true
    end
  end
end
local stored = tonumber(redis.call('get', counter) or '0')
local fresh = stored and (stored < value or (stored == value and tonumber(ARGV[6]) == value))
if stored and stored < value then
  local clock = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local keep = tonumber(ARGV[5]) + math.max(0, math.ceil((value - clock) / 1000))
  redis.call('set', counter, ARGV[2], 'PX', keep)
end
if held and fresh then
  return 1
elseif held and stored then
  -- Still ours, but the value is not new here: the counter, negated, so that the client can
  -- raise again past it.
  return -stored
end
return 0
