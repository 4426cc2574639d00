-- Reserve stock for one order, atomically, rate limit included.
-- KEYS: 1 stock hash, 2 holds hash (order_id -> "qty:user:reserved_at_ms"), 3 per-user counts hash,
--       4 this customer's rate counter, 5 this client address's rate counter (both share the product's tag).
-- ARGV: 1 order_id, 2 quantity, 3 user_id, 4 customer limit, 5 address limit, 6 rate window (ms).
-- Redis does not roll a script back, so every check comes before the first write.
local f = redis.call('HMGET', KEYS[1], 'total', 'reserved', 'epoch', 'starts', 'ends', 'limit')
if not f[1] then
  return {'NOT_LOADED'}
end
-- A refused attempt does not use up the allowance: counters are read here and only bumped on success.
local limited = 0
for i = 4, 5 do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  if count >= tonumber(ARGV[i]) then
    limited = math.max(limited, redis.call('PTTL', KEYS[i]))
  end
end
if limited ~= 0 then
  return {'RATE_LIMITED', limited}
end
local total, reserved, epoch = tonumber(f[1]), tonumber(f[2]), f[3]
local starts, ends, limit = tonumber(f[4]), tonumber(f[5]), tonumber(f[6])
local qty = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if starts > 0 and now_ms < starts then
  return {'NOT_STARTED'}
end
if ends > 0 and now_ms >= ends then
  return {'ENDED'}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {'DUPLICATE'}
end
local available = total - reserved
if available < qty then
  return {'OUT_OF_STOCK', available}
end
local held = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
if limit > 0 and held + qty > limit then
  return {'USER_LIMIT', limit - held}
end
redis.call('HINCRBY', KEYS[1], 'reserved', qty)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ARGV[3] .. ':' .. now_ms)
redis.call('HINCRBY', KEYS[3], ARGV[3], qty)
for i = 4, 5 do
  -- Fixed windows that start at the first order in them.
  if redis.call('INCR', KEYS[i]) == 1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[6])
  end
end
return {'OK', epoch, now_ms, available - qty}
