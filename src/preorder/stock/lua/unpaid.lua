-- Customers' unpaid-units counters, outside the create path.
-- ARGV 'give', then per ask n; KEYS per ask: the customer's counter. Orders stopped being unpaid (paid,
--   cancelled, expired, or their create failed): take n off each, never below 0 (a key at 0 is deleted, so
--   customers with nothing unpaid cost no key). The asks of one loop turn (of one Redis Cluster slot) come in
--   one call, through the batcher; one answer per ask: the units left.
-- ARGV 'recount', seen, counted (KEYS[1]): the recount from PostgreSQL sets the counter to `counted` only if it
--   still reads `seen` ('' for no key), i.e. no create or payment of this customer moved it in between.
if ARGV[1] == 'give' then
  local answers = {}
  for i = 1, #KEYS do
    local left = redis.call('DECRBY', KEYS[i], ARGV[i + 1])
    if left <= 0 then
      redis.call('DEL', KEYS[i])
    end
    answers[i] = math.max(left, 0)
  end
  return answers
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
