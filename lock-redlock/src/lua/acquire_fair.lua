-- Takes the lock KEYS[1] for the token ARGV[1] with a ttl of ARGV[2] ms through its waiting
-- line (lock-core's raw/redis/line.lua and line_pass.lua, prepended, with lease_common.lua):
-- ARGV[3] is the waiter ('' for a single try), ARGV[4] the prefix of the waiters' channels,
-- ARGV[5] the waiter's place in line when its client chooses it (several nodes, which must all
-- order the waiters alike), '' for the server's clock; ARGV[6] '1' asks a refused waiter's entry
-- expiry (-1 for none) along with the gate's answer, whether the key held a lock's value or
-- nothing as the waiter read it (1, else 0: a key of another type, or a lease's value, which
-- begins with byte 0xFF), and the waiter's place behind the holder (1: second; -1 unknown), as
-- {answer, expiry, plain, place} (see line_pass.lua and line.lua's line_gate), the place only
-- from ARGV[7] on when given (line_gate's `tell_from`). With fencing,
-- KEYS[2] is the fencing counter (KEYS: lock, [fence], line, line expiry). Returns the fencing value (1 without
-- fencing) when taken, else the gate's answer (0, or -(1 + ms) for the head of the line behind
-- a holder with ms left).
if redis.replicate_commands then
  redis.replicate_commands()
end
-- A waiter whose turn it is (the key reserved for it) takes it; anyone else goes through the
-- line's gate, and a reserved key is held for them. A waiter's read of the key serves both.
local held_by
-- Whether the line's index exists, asked only when a one-node waiter read the key as free:
-- false is the gate's first test answered (nobody in line, the key free), and the attempt
-- takes the key without asking either again.
local lined
if ARGV[3] ~= '' then
  held_by = redis.pcall('get', KEYS[1])
  if ARGV[6] == '1' and held_by == false then
    lined = redis.call('exists', KEYS[#KEYS]) == 1
  end
  -- One node: a waiter that finds the key free while someone else heads a live line (a release
  -- by a client without `fair`, a holder that expired) passes the turn to that head, as a
  -- release or a plain attempt's give-back does: the key is reserved for the head until its
  -- entry lapses, and the waiter, first behind it, is told when (a dead head is waited out
  -- to the ms, not to the waiter's next poll).
  if lined then
    line_prune((line_clock()))
    local head = line_head()
    if head and head ~= ARGV[3] then
      line_pass(KEYS[1], ARGV[4], true)
      -- Absent before: a string (the reservation) or absent again, never another type.
      held_by = redis.call('get', KEYS[1])
    end
  end
end
if lined ~= false and not line_take_turn(KEYS[1], ARGV[3], held_by) then
  local gate, expiry, rank = line_gate(KEYS[1], KEYS[1], ARGV[1], ARGV[3], tonumber(ARGV[2]), ARGV[4], ARGV[5], nil, held_by, tonumber(ARGV[7]))
  if gate then
    if ARGV[6] == '1' then
      local plain = 0
      if held_by == false or (type(held_by) == 'string' and string.byte(held_by, 1) ~= 255) then
        plain = 1
      end
      return {gate, expiry or -1, plain, rank or -1}
    end
    return gate
  end
  if redis.call('exists', KEYS[1]) == 1 then
    return 0
  end
end
local value = 1
if #KEYS == 4 then
  local _, time = now_ms()
  local keep
  value, keep = draw_fence(KEYS[2], time, tonumber(ARGV[2]))
  if not value then
    return keep
  end
  keep()
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return value
