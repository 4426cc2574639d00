-- Admit order creates against limits across all products: creates per window of a customer or of a client
-- address, and the units a customer holds unpaid at once. One call takes the asks of one loop turn that share
-- a Redis Cluster slot (on a single Redis, all of them); it runs in the same pipeline as the reserve calls.
-- KEYS per ask: 1 a rate counter (fixed window), 2 the customer's unpaid-units counter (an address ask passes
--       its rate counter again, with cap -1).
-- ARGV: 1 window (ms), then per ask: rate limit, quantity, unpaid cap (-1: this ask counts no units).
-- Returns one answer per ask: {'OK'}, {'RATE_LIMITED', ms left}, {'UNPAID_LIMIT', units held} or {'ERROR', msg}.
-- Every attempt that passes the rate check uses up allowance, whatever the product then answers: a bot asking
-- for made-up products spends its allowance like anyone. Checks come before writes (no rollback in Redis).
local window = tonumber(ARGV[1])

local function admit(rate, unpaid, limit, qty, cap)
  local count = tonumber(redis.call('GET', rate) or '0')
  if count >= limit then
    local ttl = redis.call('PTTL', rate)
    if ttl < 0 then  -- a counter without a TTL would refuse for ever: give it its window
      redis.call('PEXPIRE', rate, window)
      ttl = window
    end
    return {'RATE_LIMITED', ttl}
  end
  local held = cap >= 0 and tonumber(redis.call('GET', unpaid) or '0') or 0
  if cap >= 0 and held + qty > cap then
    if redis.call('INCR', rate) == 1 then
      redis.call('PEXPIRE', rate, window)
    end
    return {'UNPAID_LIMIT', held}
  end
  if redis.call('INCR', rate) == 1 then
    redis.call('PEXPIRE', rate, window)
  end
  if cap >= 0 then
    redis.call('INCRBY', unpaid, qty)
  end
  return {'OK'}
end

local answers = {}
for i = 1, #KEYS / 2 do
  local a = 1 + (i - 1) * 3
  local ok, answer = pcall(admit, KEYS[2 * i - 1], KEYS[2 * i], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
                           tonumber(ARGV[a + 3]))
  if ok then
    answers[i] = answer
  else
    answers[i] = {'ERROR', type(answer) == 'table' and answer.err or tostring(answer)}
  end
end
return answers
