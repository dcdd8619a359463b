-- Backlog admission of one model queue (queue/backlog.ts): the work its admitted requests still hold (tokens, as
-- charged: prompt + n × max_tokens) and how fast the model's workers drain such work decide whether one more request
-- would still be waiting when QUEUE_TIMEOUT_MS runs out; if so it is refused now instead of then.
-- KEYS: [1] ZSET request id → expiry (ms), [2] HASH request id → cost (tokens), [3] HASH state: total (tokens held by
--   the entries), work (tokens drained, exponentially decayed), busy (ms with a backlog, decayed alike), at (ms of the
--   last update), [4] ZSET request id → admission time (ms) of the requests admitted within the last transit (ms).
-- ARGV: request id, cost (tokens), entry ttl (ms), queue timeout (ms), tau (ms), state ttl (ms), now (ms; '' = TIME),
--   slots (sequences the model's live workers run at once; '' = unknown), waiting (jobs waiting in the model's queue
--   now; '' = unknown), transit (ms: how long an admitted job may wait before a worker with room takes it).
-- Returns: admitted (1/0), excess wait (ms beyond the timeout, when refused), backlog (tokens, without this request),
--   drain rate (tokens/s, a string; '' = no estimate yet).
local now = tonumber(ARGV[7])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local id, cost, ttl, timeout = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tau, stateTtl, slots = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
local waiting, transit = tonumber(ARGV[9]), tonumber(ARGV[10]) or 0

-- The decay clock runs only while there was a backlog (as backlog-release.lua; keep the two in step): idle workers
-- drain nothing, which says nothing about how fast they can, so an idle hour does not wear the estimate away.
local s = redis.call('HMGET', KEYS[3], 'total', 'work', 'busy', 'at')
local total, work, busy, at = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0, tonumber(s[4])
if at and total > 0 and now > at then
  local d = math.exp(-(now - at) / tau)
  work = work * d
  busy = busy * d + tau * (1 - d)
end

-- Entries whose request can be neither waiting nor running any more: their gateway died before releasing them.
-- At most 1000 per call (unpack's limit); the rest leave on the next calls.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
if #expired > 0 then
  for _, c in ipairs(redis.call('HMGET', KEYS[2], unpack(expired))) do total = total - (tonumber(c) or 0) end
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[1], unpack(expired))
end
-- No entries left, no backlog: whatever the counter says (it cannot drift for longer than the backlog lasts).
if redis.call('ZCARD', KEYS[1]) == 0 then total = 0 end
-- A reservation sent again (a retried call) replaces the first one.
local prev = tonumber(redis.call('HGET', KEYS[2], id))
if prev then total = total - prev end
if total < 0 then total = 0 end

local rate = nil -- tokens per ms
if work > 0 and busy > 0 then rate = work / busy end
local admit, excess = 1, 0
-- Room for it now: fewer requests hold entries than the workers run sequences at once, and the engines admit by fair
-- share, so it starts at once, however much work the running ones still hold. Only while no job waits in the queue
-- for longer than its way to a worker: a job that waits longer means every worker's rows are taken, whatever the count
-- of requests says (a stuck worker, requests wider than their share). The jobs admitted within the transit time may
-- still be on their way (a burst's first jobs, queued a moment ago): as many waiting jobs as those are no sign.
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (now - transit))
local inTransit = redis.call('ZCARD', KEYS[4])
local others = redis.call('ZCARD', KEYS[1]) - (prev and 1 or 0)
local room = slots and waiting and others < slots and waiting <= inTransit
-- Otherwise it starts once the work ahead of it has drained: refused when that takes longer than the queue timeout.
-- No estimate (cold start): admitted. Nothing ahead: admitted, however large it is itself.
if not room and rate and total > 0 and total / rate > timeout then
  admit, excess = 0, math.ceil(total / rate - timeout)
end
local before = total
if admit == 1 then
  redis.call('ZADD', KEYS[1], now + ttl, id)
  redis.call('HSET', KEYS[2], id, cost)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  if transit > 0 then
    redis.call('ZADD', KEYS[4], now, id)
    redis.call('PEXPIRE', KEYS[4], transit + 1000)
  end
  total = total + cost
end
redis.call('HSET', KEYS[3], 'total', string.format('%.17g', total), 'work', string.format('%.17g', work),
  'busy', string.format('%.17g', busy), 'at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[3], stateTtl)
return { admit, excess, math.floor(before), rate and string.format('%.6f', rate * 1000) or '' }
