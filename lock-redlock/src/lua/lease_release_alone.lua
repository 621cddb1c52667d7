-- Removes the token ARGV[1]'s lease from KEYS[1] (alone or in the set), under any of the tags
-- in ARGV[2] ('p', 'r', 'w', 'rw'); with ARGV[3] = '1' also its claim KEYS[2]. Announces the
-- release on the channel ARGV[4] .. KEYS[1] when ARGV[4] is given. Returns 1 when a live lease or a claim
-- was removed, 0 otherwise (an expired lease is dropped, but counts as lost).
-- The path for a lease alone (or nothing) with no claim to take back, first of the release
-- script: it needs none of the helpers defined after it (defining them is most of a short
-- script's cost). The token decides (a value of ours is the marker, a zero byte, a tag and
-- the token; see `lease_alone.lua`); the rest is in `lease_release.lua`.
if ARGV[3] ~= '1' then
  local alone = redis.pcall('get', KEYS[1])
  -- A string, or false when absent (a set answers an error).
  if type(alone) ~= 'table' then
    local at = alone and string.byte(alone, 1) == 255 and string.find(alone, '\0', 1, true)
    if not at
      or string.sub(alone, at + 2) ~= ARGV[1]
      or not string.find(ARGV[2], string.sub(alone, at + 1, at + 1), 1, true)
    then
      return 0
    end
    redis.call('del', KEYS[1])
    if ARGV[4] then
      redis.pcall('publish', ARGV[4] .. KEYS[1], '1')
    end
    return 1
  end
end
