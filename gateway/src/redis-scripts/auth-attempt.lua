-- Before a credential of one client address is checked: refused when the address has failed too often in the window,
-- "wait" while its failures plus the checks in flight already reach the limit (so concurrent guesses cannot all be
-- checked before the first failure is counted), else the check is recorded as in flight, with a lease so a crashed
-- gateway's attempts expire.
-- A credential the gateway already knows to be valid ('known') is only checked against the block, never reserved.
-- KEYS: failures counter, in-flight ZSET.  ARGV: limit, lease (ms), member, known ('1'/'0').
-- Returns {1, 0} go ahead, {2, 0} wait and try again, {0, ms until the window ends} refused.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local failed = tonumber(redis.call('GET', KEYS[1])) or 0
if failed >= limit then return { 0, redis.call('PTTL', KEYS[1]) } end
if ARGV[4] == '1' then return { 1, 0 } end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if failed + redis.call('ZCARD', KEYS[2]) >= limit then return { 2, 0 } end
redis.call('ZADD', KEYS[2], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[2], lease)
return { 1, 0 }
