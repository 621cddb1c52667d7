-- Removes whole locks: each lock's counter and owner key in one step, so that a lock taken
-- again between the two keys' removals cannot lose one of them. KEYS: pairs (counter, owner).
-- Returns how many of the locks were there.
local removed = 0
for i = 1, #KEYS, 2 do
  if redis.call('unlink', KEYS[i], KEYS[i + 1]) > 0 then
    removed = removed + 1
  end
end
return removed
