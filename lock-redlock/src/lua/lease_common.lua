-- Helpers of the scripts of semaphores and read-write locks, after `lease_alone.lua` and the
-- path for a lease alone (defining them costs a short script most of its time).
local function now_ms()
  local now = redis.call('time')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), now
end

-- Turns a lease stored alone on `key` into the set form, in place, keeping its expiry to the
-- millisecond. False when `key` holds a string that is not a lease (a mutex, a value of
-- another application), left as it is; true otherwise (nothing to do for another type). A
-- lease alone that ends in this very millisecond (`now`) is dropped, as a holder of a set
-- scored `now` would be: the key is then absent.
local function as_set(key, now)
  if redis.call('type', key).ok ~= 'string' then
    return true
  end
  local marker, member = solo_parts(redis.call('get', key))
  local expires = redis.call('pexpiretime', key)
  if not marker or expires < 0 then
    return false
  end
  redis.call('del', key)
  if expires <= now then
    return true
  end
  local expiry = string.format('%.0f', expires)
  redis.call('zadd', key, 0, marker, expiry, member)
  redis.call('pexpireat', key, expiry)
  return true
end

-- What `key` holds, in the words of the client's error messages; nil when it is absent.
local function describe(key)
  local kind = redis.call('type', key).ok
  local marker
  if kind == 'none' then
    return nil
  elseif kind == 'string' then
    local value = redis.call('get', key)
    marker = solo_parts(value)
    if not marker then
      -- A mutex's value (a token) never begins with 0xFF.
      if string.byte(value, 1) == 255 then
        return 'foreign string'
      end
      return 'a mutex'
    end
  elseif kind == 'zset' then
    marker = redis.call('zrangebyscore', key, 0, 0)[1]
  end
  if kind == 'string' or kind == 'zset' then
    if marker == '\255rw' then
      return 'a read-write lock'
    elseif marker and string.sub(marker, 1, 5) == '\255sem:' then
      return 'a semaphore of ' .. string.sub(marker, 6) .. ' permit(s)'
    end
  elseif kind == 'hash' then
    local permits = redis.call('hget', key, '\255permits')
    if permits then
      return 'a semaphore of ' .. permits .. ' permit(s)'
    end
  end
  return 'foreign ' .. kind
end

-- The marker of a set of ours, or nil (absent, or not ours).
local function marker_of(key)
  if redis.call('type', key).ok ~= 'zset' then
    return nil
  end
  local marker = redis.call('zrangebyscore', key, 0, 0)[1]
  if marker and string.byte(marker, 1) == 255 then
    return marker
  end
  return nil
end

-- After a holder left the set: deletes it when no live holder is left, else makes it expire
-- with its latest holder (expired holders below are dropped by the next acquisition).
local function settle_set(key, now)
  local last = redis.call('zrange', key, -1, -1, 'withscores')
  if not last[2] or tonumber(last[2]) <= now then
    redis.call('del', key)
    return 0
  end
  redis.call('pexpireat', key, last[2])
  return 1
end

-- Drops the hash's expired slots; deletes it when none is left, else makes it expire with its
-- latest holder. Returns how many slots are held.
local function settle_slots(key, now)
  local fields = redis.call('hgetall', key)
  local live, latest = 0, 0
  for i = 1, #fields, 2 do
    if fields[i] ~= '\255permits' then
      local expiry = tonumber(string.match(fields[i + 1], '^%d+'))
      if not expiry or expiry <= now then
        redis.call('hdel', key, fields[i])
      else
        live = live + 1
        latest = math.max(latest, expiry)
      end
    end
  end
  if live == 0 then
    redis.call('del', key)
  else
    redis.call('pexpireat', key, string.format('%.0f', latest))
  end
  return live
end

-- Draws a fencing value from the counter `counter` as acquire_fenced.lua does (the largest of
-- the counter + 1 and the clock in microseconds, kept until the clock passes it plus the ttl).
-- Returns the value, or an error reply before anything was written.
local function draw_fence(counter, time, ttl)
  local largest = 9007199254740991
  local clock = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local value = clock
  local stored = redis.call('get', counter)
  if stored then
    local number = tonumber(stored)
    if not number or number ~= math.floor(number) or number < 0 or number >= largest then
      -- Named by its lock's key: the counter's own name ends in the byte 0xFF, which is no
      -- UTF-8 and would make the error unreadable to the client.
      local key = string.gsub(counter, '\255:fence$', '')
      return nil, redis.error_reply('ERR the fencing counter of ' .. key .. ' holds no integer below 2^53')
    end
    value = math.max(value, number + 1)
  end
  if value >= largest then
    return nil, redis.error_reply('ERR fencing value would exceed 2^53 (is this server clock far ahead?)')
  end
  return value, function()
    local keep = ttl + math.ceil((value - clock) / 1000)
    redis.call('set', counter, string.format('%.0f', value), 'PX', keep)
  end
end
