-- The rest of `lease_release_alone.lua`: a set of holders, or a writer's claim to take back.
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
  redis.pcall('publish', ARGV[4] .. key, '1')
end
return removed
