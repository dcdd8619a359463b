-- Makes room in the response cache's byte budget for one entry (Redis runs with noeviction, so the cache keeps
-- itself inside CACHE_L2_MAX_BYTES). Touches only the cache's own bookkeeping (one hash tag, one slot): the entries
-- themselves live under other keys, so the caller writes the new entry and deletes the evicted ones after this call.
-- Expired entries leave first, then those closest to expiry.
-- KEYS: index ZSET (entry → expiry), sizes HASH (entry → bytes), bytes counter.
-- ARGV: entry key, ttl (ms), budget (bytes), size (bytes).
-- Returns {1 or 0 (reserved or not), evicted entry keys…}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entry, ttl, budget, size = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local evicted = {}
local function forget(k)
  local s = tonumber(redis.call('HGET', KEYS[2], k)) or 0
  redis.call('DECRBY', KEYS[3], s)
  redis.call('HDEL', KEYS[2], k)
  redis.call('ZREM', KEYS[1], k)
end
local function evict(k)
  forget(k)
  table.insert(evicted, k)
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do evict(k) end
forget(entry) -- its previous version, if any, is replaced
while (tonumber(redis.call('GET', KEYS[3])) or 0) + size > budget do
  local victim = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not victim then break end
  evict(victim)
end
if (tonumber(redis.call('GET', KEYS[3])) or 0) + size > budget then return { 0, unpack(evicted) } end
redis.call('ZADD', KEYS[1], now + ttl, entry)
redis.call('HSET', KEYS[2], entry, size)
redis.call('INCRBY', KEYS[3], size)
return { 1, unpack(evicted) }
