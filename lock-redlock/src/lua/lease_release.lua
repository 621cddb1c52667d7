-- Removes the token ARGV[1]'s lease from KEYS[1] (alone or in the set), under any of the tags
-- in ARGV[2] ('p', 'r', 'w', 'rw'); with ARGV[3] = '1' also its claim KEYS[2]. Announces the release on
-- the channel ARGV[4] .. KEYS[1] when ARGV[4] is given. Returns 1 when a live lease or a claim
-- was removed, 0 otherwise (an expired lease is dropped, but counts as lost).
local key, claim, token, tags = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local removed = 0
-- A string: a lease alone, or a mutex (never ours); a set answers an error, caught.
local alone = redis.pcall('get', key)
if type(alone) == 'string' then
  if solo_holds(alone, tags, token) then
    redis.call('del', key)
    removed = 1
  end
elseif alone then
  local now = now_ms()
  -- Only our sets hold a member of this shape; any other key answers an error, caught.
  local members = {}
  for i = 1, #tags do
    members[i] = string.sub(tags, i, i) .. token
  end
  local scores = redis.pcall('zmscore', key, unpack(members))
  if type(scores) == 'table' and not scores.err then
    local ours = false
    for i = 1, #members do
      if scores[i] then
        ours = true
        redis.call('zrem', key, members[i])
        if tonumber(scores[i]) > now then
          removed = 1
        end
      end
    end
    if ours then
      settle_set(key, now)
    end
  end
end
if ARGV[3] == '1' and redis.call('type', claim).ok == 'string' and redis.call('get', claim) == token then
  redis.call('del', claim)
  removed = 1
end
if removed == 1 and ARGV[4] then
  redis.call('publish', ARGV[4] .. key, '1')
end
return removed
