-- Shared by the scripts of semaphores and read-write locks, first of each (then, for the
-- acquisition and the release, their path for a lease alone, then `lease_common.lua`).
--
-- One node, a semaphore or a read-write lock: a lease alone on KEYS[1] is one string, the
-- kind's marker ('\255sem:<N>' or '\255rw'), a zero byte, its tag ('p' permit, 'r' reader,
-- 'w' writer) and its token, expiring with it: taking and releasing it costs what a mutex
-- costs. A second holder turns it into a sorted set of holders, each member a tag followed by
-- the token, scored by its expiry in this server's milliseconds, plus the marker scored 0. A
-- writer that waits leaves a claim, '<key>\255:claim', a string holding its token.
-- Several nodes, a semaphore: KEYS[1] is a hash of permit slots, '<i>' = '<expiry> <token>',
-- beside '\255permits' = N. Expired holders are dropped by whoever touches the key next, and
-- the key expires with its latest holder.
-- The marker and the member (tag and token) of a lease stored alone, when `value` is one: the
-- marker of a read-write lock or of a semaphore, a zero byte, a tag and a token. Any other
-- string beginning with 0xFF (a binary value of another application) is none of ours.
local function solo_parts(value)
  if type(value) ~= 'string' or string.byte(value, 1) ~= 255 then
    return nil
  end
  local at = string.find(value, '\0', 1, true)
  if not at then
    return nil
  end
  local marker, member = string.sub(value, 1, at - 1), string.sub(value, at + 1)
  if marker ~= '\255rw' and not string.find(marker, '^\255sem:%d+$') then
    return nil
  end
  if not string.find(member, '^[prw].') then
    return nil
  end
  return marker, member
end

-- Whether the lease stored alone as `value` is the token's under one of the tags in `tags`.
local function solo_holds(value, tags, token)
  local marker, member = solo_parts(value)
  return marker ~= nil
    and string.sub(member, 2) == token
    and string.find(tags, string.sub(member, 1, 1), 1, true) ~= nil
end

