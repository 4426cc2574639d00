-- A customer's unpaid-units counter (KEYS[1]), outside the create path.
-- ARGV 'give', n: an order stopped being unpaid (paid, cancelled, expired, or its create failed): take n off,
--   never below 0 (a key at 0 is deleted, so customers with nothing unpaid cost no key).
-- ARGV 'recount', seen, counted: the recount from PostgreSQL sets the counter to `counted` only if it still
--   reads `seen` ('' for no key), i.e. no create or payment of this customer moved it in between.
if ARGV[1] == 'give' then
  local left = redis.call('DECRBY', KEYS[1], ARGV[2])
  if left <= 0 then
    redis.call('DEL', KEYS[1])
  end
  return math.max(left, 0)
end
local now = redis.call('GET', KEYS[1]) or ''
if now ~= ARGV[2] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
