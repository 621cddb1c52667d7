-- The end of release_fair.lua, after the line's helpers: someone is in line, or a waiter
-- leaves it.
line_pass_from(KEYS[1], ARGV[2], ARGV[3])
return deleted
