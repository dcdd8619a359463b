-- After a credential check recorded by auth-attempt.lua: it is no longer in flight, and a failure is counted (the
-- window starts with the first failure).
-- KEYS: failures counter, in-flight ZSET.  ARGV: member, failed ('1'/'0'), window (ms).  Returns the failure count.
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] ~= '1' then return tonumber(redis.call('GET', KEYS[1])) or 0 end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3])) end
return n
