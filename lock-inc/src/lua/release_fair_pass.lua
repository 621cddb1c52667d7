-- The end of release_fair.lua, after the line's helpers: someone is in line, or a waiter
-- leaves it (giving up the lock given to it, if any). The lock, when free, goes to the head.
line_give_back(KEYS[2], ARGV[2], KEYS[1], KEYS[2])
line_grant(KEYS[1], KEYS[2], KEYS[3], ARGV[3])
return released
