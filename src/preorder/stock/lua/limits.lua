-- Admit order creates against limits across all products: creates per window of a customer and of a client
-- address, and the units a customer holds unpaid at once. One call takes the asks of one loop turn that share
-- a Redis Cluster slot (on a single Redis, all of them); it runs in the same pipeline as the reserve calls.
-- KEYS per ask: 1 the customer's rate counter, 2 its unpaid-units counter, 3 the client address's rate counter.
--       On a single Redis one ask holds all three (mode 'both'); Redis Cluster needs one ask per slot, so the
--       customer's (mode 'customer', KEYS 1 2 1) and the address's (mode 'address', KEYS 3 3 3) go apart.
-- ARGV: 1 window (ms), 2 customer limit, 3 unpaid cap (units), 4 address limit, 5 mode, then per ask: quantity.
--       (The limits are the call's, not each ask's: the fewer arguments per create, the less to encode.)
-- Returns one answer per ask: {'OK'}, {'RATE_LIMITED', ms left, 1 (customer) or 2 (address)},
--   {'UNPAID_LIMIT', units held} or {'ERROR', msg}.
-- Every attempt counts against the rates, whatever the product then answers: a bot asking for made-up products
-- spends its allowance like anyone. An ask refused by a rate or the unpaid cap holds no units.
local window = tonumber(ARGV[1])
local customer_limit, cap, address_limit, mode = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]

-- Counts first and checks after (one write, no read): this path runs for every create, in Redis's one thread.
local function over_rate(rate, limit)
  local count = redis.call('INCR', rate)
  if count == 1 then  -- fixed windows that start at the first create in them
    redis.call('PEXPIRE', rate, window)
  elseif count > limit then
    local ttl = redis.call('PTTL', rate)
    if ttl < 0 then  -- a counter without a TTL would refuse for ever: give it its window
      redis.call('PEXPIRE', rate, window)
      ttl = window
    end
    return ttl
  end
  return nil
end

local function admit(rate, unpaid, address_rate, qty)
  if mode == 'address' then
    local ttl = over_rate(address_rate, address_limit)
    return ttl and {'RATE_LIMITED', ttl, 2} or {'OK'}
  end
  local ttl, which = over_rate(rate, customer_limit), 1
  if mode == 'both' then
    local ttl2 = over_rate(address_rate, address_limit)
    if ttl2 and (not ttl or ttl2 > ttl) then
      ttl, which = ttl2, 2
    end
  end
  if ttl then
    return {'RATE_LIMITED', ttl, which}
  end
  local held = redis.call('INCRBY', unpaid, qty)
  if held > cap then  -- refused: take the units back (a key back at 0 is deleted, as give-backs do)
    if held == qty then
      redis.call('DEL', unpaid)
    else
      redis.call('DECRBY', unpaid, qty)
    end
    return {'UNPAID_LIMIT', held - qty}
  end
  return {'OK'}
end

local answers = {}
for i = 1, #KEYS / 3 do
  local k = (i - 1) * 3
  local ok, answer = pcall(admit, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], tonumber(ARGV[5 + i]))
  if ok then
    answers[i] = answer
  else
    answers[i] = {'ERROR', type(answer) == 'table' and answer.err or tostring(answer)}
  end
end
return answers
