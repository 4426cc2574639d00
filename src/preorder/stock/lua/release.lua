-- Settle an order's hold: give its stock back ('release') or keep it sold ('drop', on shipping).
-- KEYS: 1 stock hash, 2 holds hash, 3 per-user counts hash, 4 fresh holds.
-- ARGV: 1 order_id, 2 'release' | 'drop'.
-- Only what the hold still holds is given back, and the hold is deleted: a second call gives back nothing.
-- No counters (lost with Redis data): nothing to give back to, and HINCRBY would create a counter-only
-- stock hash that looks loaded. The rebuild replaces the holds anyway.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return 0
end
local qty_s, user = string.match(hold, '^(%d+):(.*):%d+$')
local qty = tonumber(qty_s)
-- Checked before the first write: a malformed hold stays where it is (for an operator to see), rather than
-- being deleted without its units given back.
if not qty or qty <= 0 then
  return redis.error_reply('malformed hold of ' .. ARGV[1] .. ': ' .. hold)
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[2] == 'release' then
  redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
  if redis.call('HINCRBY', KEYS[3], user, -qty) <= 0 then
    redis.call('HDEL', KEYS[3], user)
  end
end
return qty
