-- Give back the stock of many orders' holds of one product in one call (the sweeper's forfeit and expiry
-- rounds): release.lua's 'release' for each order id, in one round trip instead of one each.
-- KEYS: 1 stock hash, 2 holds hash, 3 per-user counts hash, 4 fresh holds.
-- ARGV: the order ids.
-- Returns {units given back, holds released, malformed order ids...}. A hold already gone gives back nothing
-- (a second call is a no-op); a malformed hold is left where it is, untouched, and named in the reply, so
-- one bad hold does not stop the others. No counters (lost with Redis data): nothing to give back to.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
local given, released, malformed = 0, 0, {}
local per_user = {}
for i = 1, #ARGV do
  local hold = redis.call('HGET', KEYS[2], ARGV[i])
  if hold then
    local qty_s, user = string.match(hold, '^(%d+):(.*):%d+$')
    local qty = tonumber(qty_s)
    if not qty or qty <= 0 then
      malformed[#malformed + 1] = ARGV[i]
    else
      redis.call('HDEL', KEYS[2], ARGV[i])
      redis.call('ZREM', KEYS[4], ARGV[i])
      per_user[user] = (per_user[user] or 0) + qty
      given, released = given + qty, released + 1
    end
  end
end
if given > 0 then
  redis.call('HINCRBY', KEYS[1], 'reserved', -given)
end
for user, qty in pairs(per_user) do
  if redis.call('HINCRBY', KEYS[3], user, -qty) <= 0 then
    redis.call('HDEL', KEYS[3], user)
  end
end
local reply = {given, released}
for _, id in ipairs(malformed) do
  reply[#reply + 1] = id
end
return reply
