-- Rate limits as GCRA (a token bucket kept as one time stamp per dimension): O(1) per admission, whatever the
-- traffic. Per bucket, HASH fields r and t are the "theoretical arrival times" of the request and token budgets: the
-- moment at which the bucket would be full again. A request that costs c moves a budget's time stamp c·(window/limit)
-- forward; it is admitted when no stamp would then lie more than one window ahead of now (so a full bucket allows a
-- burst of `limit`, refilled continuously at limit per window). Redis' own clock (TIME): replicas with skewed clocks
-- share one budget. All or nothing across buckets.
-- KEYS: one HASH per bucket.  ARGV: window (ms), cost (tokens), dry ('1' = only read), then rpm, tpm per bucket.
-- Returns: admitted (1/0), retry (ms until it would fit, -1 = never), limited by ('requests' | 'tokens' | ''),
-- then per bucket: ms until the request budget is full, ms until the token budget is full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local dry = ARGV[3] == '1'
local admit, retry, limitedBy = true, 0, ''
local S = {}

local function later(w, what)
  if retry >= 0 and w > retry then
    retry = w
    limitedBy = what
  end
end

for b = 1, #KEYS do
  local rpm, tpm = tonumber(ARGV[2 + 2 * b]), tonumber(ARGV[3 + 2 * b])
  local v = redis.call('HMGET', KEYS[b], 'r', 't')
  local r = math.max(tonumber(v[1]) or 0, now)
  local tk = math.max(tonumber(v[2]) or 0, now)
  local nr, nt = r, tk
  if rpm > 0 then
    nr = r + window / rpm
    if nr - now > window then
      admit = false
      later(nr - window - now, 'requests')
    end
  end
  if tpm > 0 then
    if cost > tpm then
      admit = false
      retry, limitedBy = -1, 'tokens'
    else
      nt = tk + cost * window / tpm
      if nt - now > window then
        admit = false
        later(nt - window - now, 'tokens')
      end
    end
  end
  S[b] = { r = r, t = tk, nr = nr, nt = nt }
end
if dry then admit = false end

local out = { admit and 1 or 0, math.ceil(retry), limitedBy }
for b = 1, #KEYS do
  local s = S[b]
  local r, tk = s.r, s.t
  if admit then
    r, tk = s.nr, s.nt
    -- %.3f: tostring keeps 14 digits, too few for a millisecond time stamp with its fraction.
    redis.call('HSET', KEYS[b], 'r', string.format('%.3f', r), 't', string.format('%.3f', tk))
    redis.call('PEXPIRE', KEYS[b], math.ceil(math.max(r, tk) - now) + 1000)
  end
  table.insert(out, math.ceil(r - now))
  table.insert(out, math.ceil(tk - now))
end
return out
