-- Corrects what an admission charged (rate-admit.lua): the token estimate by the real usage, or the whole request
-- given back. A budget never refills beyond full: a correction to a bucket that has already refilled is lost.
-- KEYS: one HASH per bucket.  ARGV: window (ms), token delta (real − charged), refund request ('1'/'0'),
-- then rpm, tpm per bucket.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = tonumber(ARGV[1])
local delta = tonumber(ARGV[2])
local refund = ARGV[3] == '1'
for b = 1, #KEYS do
  local rpm, tpm = tonumber(ARGV[2 + 2 * b]), tonumber(ARGV[3 + 2 * b])
  local v = redis.call('HMGET', KEYS[b], 'r', 't')
  local r = math.max(tonumber(v[1]) or 0, now)
  local tk = math.max(tonumber(v[2]) or 0, now)
  if refund and rpm > 0 then r = math.max(now, r - window / rpm) end
  if tpm > 0 then tk = math.max(now, tk + delta * window / tpm) end
  if r > now or tk > now then
    redis.call('HSET', KEYS[b], 'r', string.format('%.3f', r), 't', string.format('%.3f', tk))
    redis.call('PEXPIRE', KEYS[b], math.ceil(math.max(r, tk) - now) + 1000)
  else
    redis.call('DEL', KEYS[b])
  end
end
return 1
