-- Deletes each key in KEYS whose value is still the token ARGV[1] (compare-and-delete).
-- Returns how many keys were deleted; keys held by anyone else are left alone.
local deleted = 0
for i = 1, #KEYS do
  if redis.pcall('get', KEYS[i]) == ARGV[1] then
    deleted = deleted + redis.call('del', KEYS[i])
  end
end
return deleted
