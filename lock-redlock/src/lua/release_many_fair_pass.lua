-- The end of release_many_fair.lua, after the line's helpers: some freed keys have a line.
-- The helpers read the line through LINE and LINE_EXPIRY, pointed at each key's in turn.
for _, i in ipairs(freed) do
  LINE, LINE_EXPIRY = KEYS[i + 1], KEYS[i + 2]
  line_pass(KEYS[i], ARGV[2])
end
return deleted
