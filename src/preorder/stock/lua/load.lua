-- Replace a product's counters, holds and per-user counts with a snapshot rebuilt from PostgreSQL.
-- KEYS: 1 stock hash, 2 holds hash, 3 per-user counts hash, 4 fresh holds (emptied: every hold of a snapshot
--       has its order row).
-- ARGV: 1 epoch, 2 total, 3 reserved, 4 starts_ms, 5 ends_ms, 6 per-user limit, 7 number of holds,
--       then that many (order_id, hold value) pairs, then (user_id, count) pairs to the end.
-- A snapshot older than what Redis holds is ignored: two loaders may finish in either order.
local current = redis.call('HGET', KEYS[1], 'epoch')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local nholds = tonumber(ARGV[7])
local i = 8
for _ = 1, nholds do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i < #ARGV do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- The stock hash goes last: until it exists, every reserve answers NOT_LOADED.
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'total', ARGV[2], 'reserved', ARGV[3],
  'starts', ARGV[4], 'ends', ARGV[5], 'limit', ARGV[6])
return 1
