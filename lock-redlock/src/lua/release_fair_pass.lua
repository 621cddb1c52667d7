-- The end of release_fair.lua, after the line's helpers: someone is in line, or a waiter
-- leaves it. A release that was the holder's deleted the key above: it was no reservation for
-- the waiter, and it is known free (not asked again).
if deleted == 1 then
  if ARGV[2] ~= '' then
    line_leave(ARGV[2])
  end
  line_pass(KEYS[1], ARGV[3], true)
else
  line_pass_from(KEYS[1], ARGV[2], ARGV[3])
end
return deleted
