-- The path for a lease alone on a free key, unfenced, first of the acquisition script: it
-- needs none of the helpers defined after it (defining them is most of a short script's
-- cost). The same as `take_alone` in `lease_acquire.lua`, which serves the other cases, but
-- answering 2: the client then knows the key was free, and tries its next lease on it with a
-- plain `SET ... NX` first (see `NodeParts::take_alone`).
if not KEYS[3] and redis.call('type', KEYS[1]).ok == 'none' then
  if ARGV[3] == 'r' and redis.call('exists', KEYS[2]) == 1 then
    return 0
  end
  if ARGV[3] == 'w' then
    redis.call('del', KEYS[2])
  end
  redis.call('set', KEYS[1], ARGV[4] .. '\0' .. ARGV[3] .. ARGV[1], 'PX', ARGV[2])
  return 2
end
