-- One concurrency slot of a caller: a ZSET of in-flight request ids scored by lease expiry, so the slots of a crashed
-- gateway free themselves when their lease runs out.
-- KEYS: the caller's ZSET.  ARGV: member, max, lease (ms).  Returns 1 (taken) or 0 (at the limit).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
