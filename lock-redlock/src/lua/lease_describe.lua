-- What each key of KEYS holds: '' when absent, else as `describe` names it.
local out = {}
for i = 1, #KEYS do
  out[i] = describe(KEYS[i]) or ''
end
return out
