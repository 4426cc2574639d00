-- Reserve stock for one or more orders of one product, atomically and in order, rate limits included:
-- the same outcome as running the orders one after another, in one script call.
-- KEYS: 1 stock hash, 2 holds hash (order_id -> "qty:user:reserved_at_ms"), 3 per-user counts hash, 4 fresh
--       holds (sorted set order_id by reserved_at_ms: holds the reconciler has yet to find an order row for),
--       5 the unknown-product marker (set by a loader that found no such product in PostgreSQL),
--       then per order two rate counters, this customer's and this client address's (all share the tag).
-- ARGV: 1 customer limit, 2 address limit, 3 rate window (ms), then per order: order_id, quantity, user_id.
-- Returns one answer per order. Redis does not roll a script back, so each order's checks come before its writes.
-- An ask that raised an error answers {'ERROR', message}; the caller answers it 503.
local f = redis.call('HMGET', KEYS[1], 'total', 'reserved', 'epoch', 'starts', 'ends', 'limit')
local n = (#ARGV - 3) / 3
local answers = {}
if not f[1] then
  -- Only a product without counters can be unknown: a loaded one is known whatever a stale marker says.
  local code = redis.call('EXISTS', KEYS[5]) == 1 and 'UNKNOWN' or 'NOT_LOADED'
  for i = 1, n do
    answers[i] = {code}
  end
  return answers
end
local total, reserved, epoch = tonumber(f[1]), tonumber(f[2]), f[3]
local starts, ends, limit = tonumber(f[4]), tonumber(f[5]), tonumber(f[6])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function reserve(rate_keys, order_id, qty, user)
  -- A refused attempt does not use up the allowance: counters are read here and only bumped on success.
  local limited = 0
  for i = 1, 2 do
    local count = tonumber(redis.call('GET', rate_keys[i]) or '0')
    if count >= tonumber(ARGV[i]) then
      local ttl = redis.call('PTTL', rate_keys[i])
      if ttl < 0 then
        -- A counter without a TTL (-1) would refuse this customer for ever, and read as 0 it used to refuse
        -- nothing at all: give it the window it should have had, and refuse for that long.
        redis.call('PEXPIRE', rate_keys[i], ARGV[3])
        ttl = tonumber(ARGV[3])
      end
      limited = math.max(limited, ttl)
    end
  end
  if limited ~= 0 then
    return {'RATE_LIMITED', limited}
  end
  if starts > 0 and now_ms < starts then
    return {'NOT_STARTED'}
  end
  if ends > 0 and now_ms >= ends then
    return {'ENDED'}
  end
  if redis.call('HEXISTS', KEYS[2], order_id) == 1 then
    return {'DUPLICATE'}
  end
  local available = total - reserved
  if available < qty then
    return {'OUT_OF_STOCK', available}
  end
  local held = tonumber(redis.call('HGET', KEYS[3], user) or '0')
  if limit > 0 and held + qty > limit then
    return {'USER_LIMIT', limit - held}
  end
  reserved = reserved + qty
  redis.call('HINCRBY', KEYS[1], 'reserved', qty)
  redis.call('HSET', KEYS[2], order_id, qty .. ':' .. user .. ':' .. now_ms)
  redis.call('HINCRBY', KEYS[3], user, qty)
  redis.call('ZADD', KEYS[4], now_ms, order_id)
  for i = 1, 2 do
    -- Fixed windows that start at the first order in them.
    if redis.call('INCR', rate_keys[i]) == 1 then
      redis.call('PEXPIRE', rate_keys[i], ARGV[3])
    end
  end
  return {'OK', epoch, now_ms, total - reserved}
end

for i = 1, n do
  local a = 3 + (i - 1) * 3
  local k = 5 + (i - 1) * 2
  -- One ask's error (a key of the wrong type, say) answers that ask alone: the others of the call still run.
  -- Its checks come before its writes, so an ask that fails in them has written nothing.
  local ok, answer = pcall(reserve, {KEYS[k + 1], KEYS[k + 2]}, ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3])
  if ok then
    answers[i] = answer
  else
    answers[i] = {'ERROR', type(answer) == 'table' and answer.err or tostring(answer)}
  end
end
return answers
