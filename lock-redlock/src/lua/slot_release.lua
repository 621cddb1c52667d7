-- Frees the permit slot ARGV[2] of the hash KEYS[1] if the token ARGV[1] holds it (every slot
-- the token holds when ARGV[2] is empty). Announces the release on the channel ARGV[3] ..
-- KEYS[1] when ARGV[3] is given. Returns 1 when a live slot was freed, 0 otherwise.
local key, token, slot = KEYS[1], ARGV[1], ARGV[2]
local now = now_ms()
if redis.call('type', key).ok ~= 'hash' or not redis.call('hget', key, '\255permits') then
  return 0
end
local removed = 0
local fields = redis.call('hgetall', key)
for i = 1, #fields, 2 do
  local field, value = fields[i], fields[i + 1]
  if field ~= '\255permits' and (slot == '' or field == slot) then
    local expiry, holder = string.match(value, '^(%d+) (.*)$')
    if holder == token then
      redis.call('hdel', key, field)
      if tonumber(expiry) > now then
        removed = 1
      end
    end
  end
end
settle_slots(key, now)
if removed == 1 and ARGV[3] then
  redis.pcall('publish', ARGV[3] .. key, '1')
end
return removed
