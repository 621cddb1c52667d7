-- Takes every lock in KEYS[1..n] for the token ARGV[1] with a ttl of ARGV[2] ms, or none of
-- them, where n = #KEYS / 2, and draws one fencing value from their counters KEYS[n+1..2n]:
-- the largest of every counter + 1 and the server's clock in microseconds, so that the value
-- is above every earlier value of every key, and a node that restarted empty still hands out
-- values above those it gave before (while its clock does not step back). Every counter is set
-- to the value, and kept until this server's clock has passed it plus the lock's ttl: once a
-- counter expires, the clock alone counts past it. Returns the value (>= 1) when every lock was
-- free, 0 when any was held. Values are exact integers only below 2^53 (Lua numbers are
-- doubles): a counter that is not such a number is an error, raised before anything is written.
if redis.replicate_commands then
  redis.replicate_commands()
end
local n = #KEYS / 2
local largest = 9007199254740991
for i = 1, n do
  if redis.call('exists', KEYS[i]) == 1 then
    return 0
  end
end
local now = redis.call('time')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local value = clock
for i = n + 1, 2 * n do
  local stored = redis.call('get', KEYS[i])
  if stored then
    local counter = tonumber(stored)
    if not counter or counter ~= math.floor(counter) or counter < 0 or counter >= largest then
      return redis.error_reply('ERR the fencing counter of ' .. KEYS[i - n] .. ' holds no integer below 2^53')
    end
    value = math.max(value, counter + 1)
  end
end
if value >= largest then
  return redis.error_reply('ERR fencing value would exceed 2^53 (is this server clock far ahead?)')
end
for i = 1, n do
  redis.call('set', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
local keep = tonumber(ARGV[2]) + math.ceil((value - clock) / 1000)
for i = n + 1, 2 * n do
  redis.call('set', KEYS[i], string.format('%.0f', value), 'PX', keep)
end
return value
