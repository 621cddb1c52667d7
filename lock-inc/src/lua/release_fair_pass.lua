-- The end of release_fair.lua, after the line's helpers: someone is in line, or a waiter
-- leaves it (giving up the lock given to it, if any). The lock, when free, goes to the head.
-- A release that was the holder's deleted the owner and the counter above: nothing can have
-- been given to the waiter, and the lock is known free (not asked again).
if released == 1 then
  if ARGV[2] ~= '' then
    line_leave(ARGV[2])
  end
else
  line_give_back(KEYS[2], ARGV[2], KEYS[1], KEYS[2])
end
line_grant(KEYS[1], KEYS[2], KEYS[3], ARGV[3], released == 1)
return released
