/**
 * Requests and tokens per window, shared by every gateway replica through Redis: a sliding-window log, one Lua script
 * per admission, with Redis' own clock (TIME) so replicas with skewed clocks still share one exact budget.
 *
 * A bucket is a ZSET of admitted requests (member = request id, score = admission time) and a HASH of their token
 * costs. Admission drops entries older than the window, then admits only if *every* bucket has room for one more
 * request and `cost` more tokens, and records the request in all of them (all or nothing). Because it is a log, not a
 * fixed window, no burst can exceed the limit at a window's edge, and the wait until there is room is known exactly:
 * it is when the entry that must leave expires. Costs can be corrected later (real usage replaces the estimate).
 */
import type Redis from 'ioredis';

export interface Bucket {
  /** Redis key stem of this budget (e.g. the caller's id). */
  id: string;
  /** Requests per window; 0 = unlimited. */
  rpm: number;
  /** Tokens per window; 0 = unlimited. */
  tpm: number;
}

export interface BucketState {
  bucket: Bucket;
  remainingRequests: number;
  remainingTokens: number;
  /** Until the window holds no request / no token of this bucket any more (OpenAI's x-ratelimit-reset-*). */
  resetRequestsMs: number;
  resetTokensMs: number;
  usedRequests: number;
  usedTokens: number;
}

export interface Admission {
  admitted: boolean;
  /** When refused: ms until this request would fit; -1 when it never can (cost above the token limit). */
  retryAfterMs: number;
  /** Which limit refused it. */
  limitedBy: 'requests' | 'tokens' | null;
  states: BucketState[];
}

const logKey = (id: string) => `llm:rl:{${id}}:log`;
const costKey = (id: string) => `llm:rl:{${id}}:cost`;

// KEYS: log1, cost1, log2, cost2, …  ARGV: window, member, cost, dry (1 = only read), rpm1, tpm1, rpm2, tpm2, …
const ADMIT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local member = ARGV[2]
local cost = tonumber(ARGV[3])
local dry = ARGV[4] == '1'
local n = #KEYS / 2
local from = now - window
local B = {}
local admit = true
local retry, limitedBy = 0, ''
for b = 1, n do
  local log, costs = KEYS[2 * b - 1], KEYS[2 * b]
  local rpm, tpm = tonumber(ARGV[3 + 2 * b]), tonumber(ARGV[4 + 2 * b])
  local expired = redis.call('ZRANGEBYSCORE', log, '-inf', from)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', log, '-inf', from)
    for i = 1, #expired, 5000 do
      redis.call('HDEL', costs, unpack(expired, i, math.min(i + 4999, #expired)))
    end
  end
  local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  local count = #entries / 2
  local ts, cs, tokens = {}, {}, 0
  for i = 1, count do
    ts[i] = tonumber(entries[2 * i])
    cs[i] = tonumber(redis.call('HGET', costs, entries[2 * i - 1])) or 0
    tokens = tokens + cs[i]
  end
  if rpm > 0 and count + 1 > rpm then
    admit = false
    local w = ts[count - rpm + 1] + window - now
    if retry >= 0 and w > retry then retry = w; limitedBy = 'requests' end
  end
  if tpm > 0 and tokens + cost > tpm then
    admit = false
    if cost > tpm then
      retry = -1; limitedBy = 'tokens'
    elseif retry >= 0 then
      local freed = 0
      for i = 1, count do
        freed = freed + cs[i]
        if tokens - freed + cost <= tpm then
          local w = ts[i] + window - now
          if w > retry then retry = w; limitedBy = 'tokens' end
          break
        end
      end
    end
  end
  B[b] = {log = log, costs = costs, rpm = rpm, tpm = tpm, ts = ts, cs = cs, count = count, tokens = tokens}
end
if dry then admit = false end
local out = {admit and 1 or 0, retry, limitedBy}
for b = 1, n do
  local s = B[b]
  if admit then
    redis.call('ZADD', s.log, now, member)
    redis.call('HSET', s.costs, member, cost)
    redis.call('PEXPIRE', s.log, window + 1000)
    redis.call('PEXPIRE', s.costs, window + 1000)
    s.count = s.count + 1
    s.tokens = s.tokens + cost
    s.ts[s.count] = now
    s.cs[s.count] = cost
  end
  local resetReq, resetTok = 0, 0
  if s.count > 0 then resetReq = s.ts[s.count] + window - now end
  for i = s.count, 1, -1 do
    if s.cs[i] > 0 then resetTok = s.ts[i] + window - now; break end
  end
  table.insert(out, s.count)
  table.insert(out, s.tokens)
  table.insert(out, resetReq)
  table.insert(out, resetTok)
end
return out
`;

// KEYS: log1, cost1, …  ARGV: member, newCost ('' = remove the request altogether)
const ADJUST = `
for b = 1, #KEYS / 2 do
  local log, costs = KEYS[2 * b - 1], KEYS[2 * b]
  if redis.call('ZSCORE', log, ARGV[1]) then
    if ARGV[2] == '' then
      redis.call('ZREM', log, ARGV[1])
      redis.call('HDEL', costs, ARGV[1])
    else
      redis.call('HSET', costs, ARGV[1], ARGV[2])
    end
  end
end
return 1
`;

export class RateLimiter {
  constructor(
    private readonly redis: Redis,
    readonly windowMs: number,
  ) {}

  /** Admits one request of `cost` tokens into every bucket, or into none. `dry`: only reads the state. */
  async admit(buckets: Bucket[], member: string, cost: number, dry = false): Promise<Admission> {
    if (buckets.length === 0) return { admitted: !dry, retryAfterMs: 0, limitedBy: null, states: [] };
    const keys = buckets.flatMap((b) => [logKey(b.id), costKey(b.id)]);
    const argv = [this.windowMs, member, Math.max(0, Math.round(cost)), dry ? '1' : '0', ...buckets.flatMap((b) => [b.rpm, b.tpm])];
    const raw = (await this.redis.eval(ADMIT, keys.length, ...keys, ...argv.map(String))) as Array<number | string>;
    const states = buckets.map((bucket, i): BucketState => {
      const [count, tokens, resetReq, resetTok] = raw.slice(3 + 4 * i, 7 + 4 * i).map(Number);
      return {
        bucket,
        usedRequests: count,
        usedTokens: tokens,
        remainingRequests: Math.max(0, bucket.rpm - count),
        remainingTokens: Math.max(0, bucket.tpm - tokens),
        resetRequestsMs: Math.max(0, resetReq),
        resetTokensMs: Math.max(0, resetTok),
      };
    });
    const limitedBy = raw[2] === 'requests' || raw[2] === 'tokens' ? raw[2] : null;
    return { admitted: Number(raw[0]) === 1, retryAfterMs: Number(raw[1]), limitedBy, states };
  }

  /** Replaces a request's token cost (the estimate by real usage), or removes the request (`null`: refunded). */
  async adjust(buckets: Bucket[], member: string, cost: number | null): Promise<void> {
    if (buckets.length === 0) return;
    const keys = buckets.flatMap((b) => [logKey(b.id), costKey(b.id)]);
    await this.redis.eval(ADJUST, keys.length, ...keys, member, cost === null ? '' : String(Math.max(0, Math.round(cost))));
  }
}
