-- Ends one request's entry in its model's backlog (backlog-reserve.lua has the layout) and, when the request ran to a
-- result, counts the tokens it had been charged as drained: the backlog is counted in charged tokens, so its drain
-- rate is measured in the same unit (an answer that stops early drains its whole charge early). A request that ended
-- without a result (cancelled, timed out in the queue, failed) leaves the backlog but drained nothing: counting it
-- would make the workers look fastest exactly while requests are timing out. Idempotent: a second call does nothing.
-- KEYS: as backlog-reserve.lua.  ARGV: request id, ran ('1'/'0'), tau (ms), state ttl (ms), now (ms; '' = TIME).
-- Returns 1 when the entry was there, else 0.
local now = tonumber(ARGV[5])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local id, ran, tau, stateTtl = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3]), tonumber(ARGV[4])
local cost = tonumber(redis.call('HGET', KEYS[2], id))
if not cost then return 0 end

-- The decay clock, as in backlog-reserve.lua (keep the two in step).
local s = redis.call('HMGET', KEYS[3], 'total', 'work', 'busy', 'at')
local total, work, busy, at = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0, tonumber(s[4])
if at and total > 0 and now > at then
  local d = math.exp(-(now - at) / tau)
  work = work * d
  busy = busy * d + tau * (1 - d)
end

redis.call('HDEL', KEYS[2], id)
redis.call('ZREM', KEYS[1], id)
total = total - cost
if redis.call('ZCARD', KEYS[1]) == 0 or total < 0 then total = 0 end
if ran then work = work + cost end
redis.call('HSET', KEYS[3], 'total', string.format('%.17g', total), 'work', string.format('%.17g', work),
  'busy', string.format('%.17g', busy), 'at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[3], stateTtl)
return 1
