-- The end of release_fair.lua, after the line's helpers: someone is in line, or a waiter
-- leaves it.
if ARGV[2] ~= '' then
  line_leave(ARGV[2])
end
line_hand_over(KEYS[1], ARGV[3])
return released
