-- ratethrottle: every counter decision of one request, atomically, in Redis.
--
-- Mirrors src/limiter (the six algorithms, blocking, RejectedHits) and the batch contract of
-- src/storage/memory.rs. Encoded and decoded by src/storage/redis/script.rs; keep both in step.
--
-- KEYS, 2 per op i (i = 1..n):
--   KEYS[2i-1]  hash  {prefix}{hex}      blocked_until and the algorithm's state
--   KEYS[2i]    zset  {prefix}{hex}:log  sliding_window_log entries (hash tag unchanged)
-- ARGV:
--   [1] now in microseconds since the Unix epoch; 0 = read Redis's own clock (TIME)
--   [2] rejected hits: 0 = Free, 1 = Counted
--   then 8 per op: algorithm (1 fixed_window, 2 sliding_window_log, 3 sliding_window_counter,
--   4 token_bucket, 5 leaky_bucket, 6 gcra), L = requests_per_unit, W = unit in µs, burst,
--   block_duration in µs (rounded up), hits, shadow (0/1), negative (0/1).
-- Reply: 4 integers per op: allowed (0/1), remaining, reset_after in µs, expires_in in µs
--   (expires_at − now).
--
-- Time is whole microseconds. At such instants the decisions (allowed, remaining) are exactly
-- those of Limit::check_and_update / Limit::refund at now = µs × 1000 ns, including rule
-- changes on a live key (another algorithm starts fresh; a bucket's level and GCRA's TAT are
-- carried across rates and units, rounding exactly as the limiter's do), looks, refunds,
-- blocks, Counted debt, limits that admit nothing and a clock that steps back. reset_after
-- and expires_in are the limiter's rounded UP to the next whole microsecond (equal when those
-- are whole microseconds). The caller rounds block_duration up to whole microseconds, which
-- changes no decision: now_µs < start_µs + ceil(d / 1000) iff
-- now_µs × 1000 < start_µs × 1000 + d.
--
-- Exact range (Lua numbers are doubles, integers are exact below 2^53):
--   instants and durations below 2^53 µs (the year 2255); beyond, they saturate there ("never")
--     where the limiter saturates at 2^64 − 1 ns;
--   fixed_window: counts below 2^53;
--   sliding_window_log: fewer than 2^53 hits recorded over a key's lifetime;
--   sliding_window_counter: (L + Counted overshoot) × W_µs < 2^53;
--   token_bucket, leaky_bucket, gcra: (burst + Counted debt) × W_µs < 2^53 (levels are kept in
--     1/W_µs of a hit); after a unit change on a live bucket, W_µs here is the least common
--     multiple of the units involved until the level drains (e.g. 15 330 days for week, month
--     and year together).
--   So a unit of a second is exact for every u32 L and burst; a minute up to 150 119 987, an
--   hour 2 501 999, a day 104 249, a week 14 892, a month 3 474, a year 285. Beyond, results
--   are rounded, never in the key's favour by more than the rounding: a decision can only
--   differ where the exact usage is within relative 2^-53 of the limit, a bucket level that
--   cannot be kept exactly is rounded up, and nothing errors.
--
-- Batch (memory.rs): ops are decided in order, later ops see earlier ops' effects on the same
-- key; a negative op refunds its hits and is reported as a look. With Free, if any op that is
-- neither shadow nor negative is rejected, every state change of the call is discarded except
-- the negative ops' refunds and the blocks started by rejections, which are replayed in order
-- on the stored states, and every admitted op is reported as a look (hits 0) at the final
-- state; rejected ops keep their outcome. With Counted everything is kept. Nothing is written
-- before the decisions are final, so a discarded change never reaches Redis.
--
-- Expiry: a written key gets PEXPIRE = the time until its state is equivalent to a fresh one
-- (the later of the algorithm's expiry and blocked_until) + GRACE_MS; a block that lands on
-- the state of another algorithm only lengthens the TTL that state needs. Like the memory
-- store's sweep, the expiry drops states that are fresh from then on.

-- Bound on first use: a Redis 7.0 function library may not touch `math` while it loads.
local floor, max, min, fmod

-- The end of time in µs: instants saturate here rather than lose precision.
local MAXT = 9007199254740991
-- Integers below this are exact doubles.
local EXACT = 9007199254740992
local U32MAX = 4294967295
-- Keys live this much longer than their state needs: Redis expires keys by its own clock,
-- and a caller that passes its own `now` (tests, a client clock) may run behind it.
local GRACE_MS = 1000

local FIXED, LOG, SWC, TOKEN, LEAKY, GCRA = 1, 2, 3, 4, 5, 6

local function fmt(x)
  return string.format('%.17g', x)
end

-- floor(a / b) for integers |a| < 2^53 and b > 0, corrected for the rounding of the division.
local function idiv(a, b)
  local q = floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function ceildiv(a, b)
  local q = idiv(a, b)
  if q * b < a then
    q = q + 1
  end
  return q
end

local function gcd(a, b)
  while b > 0 do
    a, b = b, fmod(a, b)
  end
  return a
end

-- ceil(x × num / den) for integers x >= 0, num, den > 0. Exact while x and
-- (num / gcd) × (den / gcd) stay below 2^53; beyond, rounded up by one more.
local function rescale_ceil(x, num, den)
  local g = gcd(num, den)
  num, den = num / g, den / g
  local q = idiv(x, den)
  local r = x - q * den
  local part = r * num
  local out = q * num + ceildiv(part, den)
  if part >= EXACT then
    out = out + 1
  end
  return out
end

-- Each algorithm: check(op, s, now, hits, counted) -> allowed, remaining, reset_after,
-- expires_at, recorded; refund(op, s, now, hits); expires(op, s, now). `s` is the state
-- table (fields default to 0, `{}` is a fresh state), changed in place.
local ALGO = {}

---------------------------------------------------------------- fixed_window
-- s.s window start, s.c count.
local function fw_current(W, s, now)
  local start = s.s or 0
  local at = max(now, start)
  local ws = at - fmod(at, W)
  if ws == start then
    return ws, s.c or 0
  end
  return ws, 0
end

ALGO[FIXED] = {
  check = function(op, s, now, h, counted)
    local ws, count = fw_current(op.W, s, now)
    local after = count + h
    local allowed = after <= op.L
    local record = h > 0 and (allowed or counted)
    local used = count
    if record then
      s.s, s.c = ws, after
      used = after
    end
    local wend = ws + op.W
    return allowed, max(op.L - used, 0), wend - now, wend, record
  end,
  refund = function(op, s, now, h)
    local ws = fw_current(op.W, s, now)
    if ws == (s.s or 0) then
      s.c = max((s.c or 0) - h, 0)
    end
  end,
  expires = function(op, s, now)
    local ws = fw_current(op.W, s, now)
    return ws + op.W
  end,
}

---------------------------------------------------------------- sliding_window_counter
-- s.s window start, s.p previous window's count, s.c current window's count.
local function swc_rolled(W, s, now)
  local start = s.s or 0
  local at = max(now, start)
  local ws = at - fmod(at, W)
  local d = ws - start
  local p, c = 0, 0
  if d == 0 then
    p, c = s.p or 0, s.c or 0
  elseif d == W then
    p = s.c or 0
  end
  return at, ws, p, c
end

-- Least whole number of µs until `remaining` (r < L) grows by one.
local function swc_time_to_grow(W, L, p, c, elapsed, r)
  local goal = (L - r - 1) * W
  local curr_part = c * W
  local to_boundary = W - elapsed
  if goal >= curr_part then
    local weight_left = idiv(goal - curr_part, max(p, 1))
    return to_boundary - min(weight_left, to_boundary)
  end
  local weight_left = idiv(goal, max(c, 1))
  return to_boundary + (W - min(weight_left, W))
end

ALGO[SWC] = {
  check = function(op, s, now, h, counted)
    local W, L = op.W, op.L
    local at, ws, p, c = swc_rolled(W, s, now)
    local elapsed = at - ws
    local cap = L * W
    local allowed = p * (W - elapsed) + c * W + h * W <= cap
    local record = h > 0 and (allowed or counted)
    if record then
      c = c + h
      s.s, s.p, s.c = ws, p, c
    end
    local slack = max(cap - (p * (W - elapsed) + c * W), 0)
    local r = idiv(slack, W)
    local reset = 0
    if r < L then
      reset = (at - now) + swc_time_to_grow(W, L, p, c, elapsed, r)
    end
    return allowed, r, reset, ws + 2 * W, record
  end,
  refund = function(op, s, now, h)
    local _, ws, p, c = swc_rolled(op.W, s, now)
    s.s, s.p, s.c = ws, p, max(c - h, 0)
  end,
  expires = function(op, s, now)
    local _, ws = swc_rolled(op.W, s, now)
    return ws + 2 * op.W
  end,
}

---------------------------------------------------------------- token_bucket / leaky_bucket
-- The two are the same arithmetic: s.m tokens missing (token bucket) or fill level (leaky
-- bucket) as of s.t, in units of 1/s.w of a hit. s.w is the unit in µs (W) — or, after a rule
-- changed the unit while the level was not 0, the least multiple of W in which the level the
-- limiter holds is still a whole number: the level stays exact across unit changes. A rate
-- of L per W refills (drains) L × s.w / W units per µs.

-- The level and its resolution for this op's unit W: the least multiple of W in which the
-- stored level is whole.
local function bucket_level(op, s)
  local m, r, W = s.m or 0, s.w or 0, op.W
  if m == 0 or r == 0 then
    return 0, W
  end
  if r == W then
    return m, r
  end
  -- m / r = level / (W × k): with g = gcd(W, r), r1 = r / g and d = gcd(m, r1), k = r1 / d.
  local g = gcd(W, r)
  local r1 = r / g
  local d = gcd(m, r1)
  local fine = W * (r1 / d)
  local level = (m / d) * (W / g)
  if level < EXACT and op.B * fine < EXACT then
    return level, fine
  end
  -- Beyond the exact range: round up to the op's unit (the key stays as limited or more).
  return rescale_ceil(m, W, r), W
end

local function bucket_store(op, s, level, r, at)
  if level == 0 then
    r = op.W
  end
  s.m, s.w, s.t = level, r, at
end

-- The level at `at` (>= s.t), its resolution and the refill per µs in that resolution.
local function bucket_at(op, s, at)
  local m, r = bucket_level(op, s)
  local rate = op.L * (r / op.W)
  return max(m - (at - (s.t or 0)) * rate, 0), r, rate
end

local BUCKET = {
  check = function(op, s, now, h, counted)
    local at = max(now, s.t or 0)
    local level, r, rate = bucket_at(op, s, at)
    local cap = op.B * r
    local allowed = level + h * r <= cap
    local record = h > 0 and (allowed or counted)
    if record then
      level = level + h * r
      bucket_store(op, s, level, r, at)
    end
    local remaining = idiv(max(cap - level, 0), r)
    local reset = 0
    if remaining < 1 then
      reset = (at - now) + ceildiv(level - (cap - r), rate)
    end
    return allowed, remaining, reset, at + ceildiv(level, rate), record
  end,
  refund = function(op, s, now, h)
    local at = max(now, s.t or 0)
    local level, r = bucket_at(op, s, at)
    bucket_store(op, s, max(level - h * r, 0), r, at)
  end,
  expires = function(op, s, now)
    local at = max(now, s.t or 0)
    local level, _, rate = bucket_at(op, s, at)
    return at + ceildiv(level, rate)
  end,
}
ALGO[TOKEN] = BUCKET
ALGO[LEAKY] = BUCKET

---------------------------------------------------------------- gcra
-- The limiter keeps the theoretical arrival time in units of 1/L ns, `tat`. Here it is
-- t = ceil(tat / 1000) in units of 1/L µs, kept as t = s.g × s.l + s.f (s.g whole µs,
-- 0 <= s.f < s.l, s.l the L it is kept in, 0 = fresh), and s.e = 1000 t − tat
-- (0 <= s.e < 1000), which is 0 unless a rate change rescaled the TAT. Every decision at a
-- whole µs depends on t alone; s.e makes the next rescale round exactly as the limiter's
-- does. Relative to now the TAT is
-- `ahead` = (s.g − now) × L + s.f units, where the emission interval is W units and the
-- tolerance burst × W.

-- floor(x × a / b) and the remainder, exactly, for integers 0 <= x < 2^48, 0 <= a < 2^32,
-- 0 < b < 2^32, whose quotient is below 2^53: long multiplication and division in base 2^16.
local B16 = 65536
local function muldiv(x, a, b)
  local xd, ad, p = {}, {}, { 0, 0, 0, 0, 0, 0 }
  for i = 1, 3 do
    local q = floor(x / B16)
    xd[i], x = x - q * B16, q
  end
  for i = 1, 2 do
    local q = floor(a / B16)
    ad[i], a = a - q * B16, q
  end
  for i = 1, 3 do
    for j = 1, 2 do
      p[i + j - 1] = p[i + j - 1] + xd[i] * ad[j]
    end
  end
  for k = 1, 5 do
    local q = floor(p[k] / B16)
    p[k], p[k + 1] = p[k] - q * B16, p[k + 1] + q
  end
  local q, rem = 0, 0
  for k = 6, 1, -1 do
    local cur = rem * B16 + p[k]
    local d = idiv(cur, b)
    rem = cur - d * b
    q = q * B16 + d
  end
  return q, rem
end

-- ceil(u × a / b) for integers |u| < 2^48, 0 <= a < 2^32, 0 < b < 2^32.
local function muldiv_ceil(u, a, b)
  if u < 0 then
    return -muldiv(-u, a, b)
  end
  local q, rem = muldiv(u, a, b)
  if rem > 0 then
    q = q + 1
  end
  return q
end

-- g, f, e for this op's L (see above): the limiter's rescale_ceil when the rate changed.
local function gcra_tat(op, s)
  local per = s.l or 0
  if per == 0 then
    return 0, 0, 0
  end
  local g, f, e = s.g or 0, s.f or 0, s.e or 0
  if per == op.L then
    return g, f, e
  end
  -- tat = 1000 g per + u; rescaled: 1000 g L + c.
  local c = muldiv_ceil(1000 * f - e, op.L, per)
  local t = -idiv(-c, 1000)
  local carry = idiv(t, op.L)
  return g + carry, t - carry * op.L, 1000 * t - c
end

-- Stores a TAT `ahead` units after now (e kept only while the TAT is ahead of now).
local function gcra_store(op, s, now, ahead, e)
  if ahead <= 0 then
    ahead, e = 0, 0
  end
  local q = idiv(ahead, op.L)
  s.g, s.f, s.l, s.e = now + q, ahead - q * op.L, op.L, e
end

ALGO[GCRA] = {
  check = function(op, s, now, h, counted)
    local L, W = op.L, op.W
    local g, f, e = gcra_tat(op, s)
    local ahead = (g - now) * L + f
    local pushed = max(ahead, 0) + h * W
    local tol = op.B * W
    local allowed = pushed <= tol
    local record = h > 0 and (allowed or counted)
    if record then
      if ahead <= 0 then
        e = 0
      end
      ahead = pushed
      gcra_store(op, s, now, pushed, e)
      g, f = s.g, s.f
    end
    ahead = max(ahead, 0)
    local remaining = idiv(max(tol - ahead, 0), W)
    local reset = 0
    if remaining < 1 then
      reset = ceildiv(ahead - (tol - W), L)
    end
    local tat_ceil = g
    if f > 0 then
      tat_ceil = g + 1
    end
    return allowed, remaining, reset, max(tat_ceil, now), record
  end,
  refund = function(op, s, now, h)
    local g, f, e = gcra_tat(op, s)
    gcra_store(op, s, now, (g - now) * op.L + f - h * op.W, e)
  end,
  expires = function(op, s, now)
    local g, f = gcra_tat(op, s)
    if f > 0 then
      g = g + 1
    end
    return max(g, now)
  end,
}

---------------------------------------------------------------- sliding_window_log
-- Entries (timestamp, running total of hits through it), timestamps strictly increasing, in a
-- zset: score = timestamp, member = running total (unique, as totals strictly increase). s.d is
-- the running total through the newest entry already dropped. Within a call the log is an
-- overlay that writes nothing: base ranks [lo, hi) of the zset as loaded, then `tail`, entries
-- added or changed by this call; `stale` marks a log started fresh over a zset left by an
-- earlier life of the key (the state was another algorithm's), deleted when written.
-- Expired entries are dropped only when a hit is recorded, as in Rust (which matters if the
-- clock steps back).
local function log_new(zk, n, stale)
  return { zk = zk, n = n, lo = 0, hi = n, tail = {}, cache = {}, stale = stale }
end

local function log_len(lg)
  return lg.hi - lg.lo + #lg.tail
end

-- Entry i (0-based) of the view: {ts, total}; never modify a returned base entry.
local function log_entry(lg, i)
  local nb = lg.hi - lg.lo
  if i < nb then
    local rank = lg.lo + i
    local e = lg.cache[rank]
    if not e then
      local r = redis.call('ZRANGE', lg.zk, rank, rank, 'WITHSCORES')
      e = { ts = tonumber(r[2]) or 0, total = tonumber(r[1]) or 0 }
      lg.cache[rank] = e
    end
    return e
  end
  return lg.tail[i - nb + 1]
end

local function log_total_before(lg, s, i)
  if i == 0 then
    return s.d or 0
  end
  return log_entry(lg, i - 1).total
end

-- How many entries have left the window at now, and the running total before the first one
-- still in it.
local function log_expired(lg, s, W, now)
  local nb = lg.hi - lg.lo
  local n = 0
  if nb > 0 then
    local c = redis.call('ZCOUNT', lg.zk, '-inf', fmt(now - W))
    n = min(max(c - lg.lo, 0), nb)
  end
  if n == nb then
    for i = 1, #lg.tail do
      if lg.tail[i].ts + W > now then
        break
      end
      n = n + 1
    end
  end
  return n, log_total_before(lg, s, n)
end

local function log_drain(lg, n)
  local nb = lg.hi - lg.lo
  if n <= nb then
    lg.lo = lg.lo + n
    return
  end
  lg.lo = lg.hi
  local keep = {}
  for i = n - nb + 1, #lg.tail do
    keep[#keep + 1] = lg.tail[i]
  end
  lg.tail = keep
end

local function log_set_newest_total(lg, total)
  local t = #lg.tail
  if t > 0 then
    lg.tail[t].total = total
    return
  end
  local e = log_entry(lg, lg.hi - lg.lo - 1)
  lg.hi = lg.hi - 1
  lg.tail = { { ts = e.ts, total = total } }
end

local function log_pop(lg)
  if #lg.tail > 0 then
    table.remove(lg.tail)
  else
    lg.hi = lg.hi - 1
  end
end

ALGO[LOG] = {
  check = function(op, s, now, h, counted)
    local lg, W = s.log, op.W
    local n, before = log_expired(lg, s, W, now)
    local live = log_total_before(lg, s, log_len(lg)) - before
    local allowed = live + h <= op.L
    local record = h > 0 and (allowed or counted)
    local used, first_live = live, n
    if record then
      log_drain(lg, n)
      s.d = before
      first_live = 0
      used = live + h
      local len = log_len(lg)
      local total = log_total_before(lg, s, len) + h
      -- Same instant, or a clock that stepped back: fold into the newest entry.
      if len > 0 and now <= log_entry(lg, len - 1).ts then
        log_set_newest_total(lg, total)
      else
        lg.tail[#lg.tail + 1] = { ts = now, total = total }
      end
    end
    local len = log_len(lg)
    local reset, expires = 0, now
    if first_live < len then
      reset = max(log_entry(lg, first_live).ts + W - now, 0)
      expires = max(log_entry(lg, len - 1).ts + W, now)
    end
    return allowed, max(op.L - used, 0), reset, expires, record
  end,
  -- Takes the hits back from the newest entries.
  refund = function(op, s, now, h)
    local lg, left = s.log, h
    while left > 0 do
      local len = log_len(lg)
      if len == 0 then
        return
      end
      local total = log_entry(lg, len - 1).total
      local in_entry = total - log_total_before(lg, s, len - 1)
      if in_entry <= left then
        log_pop(lg)
        left = left - in_entry
      else
        log_set_newest_total(lg, total - left)
        left = 0
      end
    end
  end,
  expires = function(op, s, now)
    local lg = s.log
    local len = lg and log_len(lg) or 0
    if len == 0 then
      return now
    end
    return max(log_entry(lg, len - 1).ts + op.W, now)
  end,
}

---------------------------------------------------------------- states of one call
-- A view: one counter's state as this call sees it. v.a algorithm of the state (0 = fresh),
-- v.b blocked_until, v.s the algorithm's fields, v.lim the op whose limit the state follows,
-- v.dirty whether it must be written.
local views

local function view(op)
  local v = views[op.hk]
  if v then
    return v
  end
  local raw = redis.call('HGETALL', op.hk)
  local s = {}
  for i = 1, #raw, 2 do
    s[raw[i]] = tonumber(raw[i + 1])
  end
  local a = s.a or 0
  local b = s.b or 0
  s.a, s.b = nil, nil
  if a == LOG then
    s.log = log_new(op.zk, redis.call('ZCARD', op.zk), false)
  end
  v = { hk = op.hk, zk = op.zk, a = a, orig_a = a, b = b, s = s, dirty = false }
  views[op.hk] = v
  return v
end

local function admits_nothing(op)
  return op.L == 0 or (op.B == 0 and op.code >= TOKEN)
end

-- When the algorithm part of v becomes equivalent to a fresh one, for outcomes that do not
-- run the algorithm (Limit::algo_expires_at).
local function algo_expires(v, op, now)
  if admits_nothing(op) then
    return now
  end
  if v.a == op.code then
    return ALGO[op.code].expires(op, v.s, now)
  end
  if op.code == FIXED or op.code == SWC then
    return ALGO[op.code].expires(op, {}, now)
  end
  return now
end

local blocks_started

-- Limit::check_and_update on a view. Returns allowed, remaining, reset_after, expires_at.
local function decide(i, v, op, now, h, counted)
  if now < v.b then
    return false, 0, v.b - now, max(algo_expires(v, op, now), v.b)
  end
  local allowed, remaining, reset, expires
  if admits_nothing(op) then
    allowed, remaining, expires = h == 0, 0, now
    if op.code == FIXED or op.code == SWC then
      reset = op.W - fmod(now, op.W)
    else
      reset = op.W
    end
  else
    local s, fresh = v.s, false
    if v.a ~= op.code then
      -- Another algorithm's state (or none): decide on a fresh one, kept only if recorded.
      s, fresh = {}, true
      if op.code == LOG then
        s.log = log_new(op.zk, 0, true)
      end
    else
      v.lim = op
    end
    local recorded
    allowed, remaining, reset, expires, recorded = ALGO[op.code].check(op, s, now, h, counted)
    if recorded then
      if fresh then
        v.a, v.s = op.code, s
      end
      v.lim, v.dirty = op, true
    end
  end
  if not allowed and h > 0 and op.bd > 0 then
    v.b = min(now + op.bd, MAXT)
    v.dirty = true
    blocks_started[i] = v.b
    remaining = 0
    reset = max(reset, op.bd)
    expires = max(expires, v.b)
  end
  return allowed, remaining, reset, expires
end

-- Limit::refund on a view: a state of another algorithm is left alone.
local function refund(v, op, now, h)
  if h == 0 or admits_nothing(op) or v.a ~= op.code then
    return
  end
  ALGO[op.code].refund(op, v.s, now, h)
  v.lim, v.dirty = op, true
end

-- Writes a changed view. Its TTL is the state's remaining life + GRACE_MS when the state is
-- one this call knows the limit of; a block on another algorithm's state only lengthens the
-- TTL, which still covers that state.
local function write(v, now)
  if not v.dirty then
    return
  end
  local known = v.a == 0 or (v.lim ~= nil and v.lim.code == v.a)
  local expiry = v.b
  if known and v.a ~= 0 then
    expiry = max(expiry, ALGO[v.a].expires(v.lim, v.s, now))
  end
  local ms = floor((min(max(expiry - now, 0), MAXT) + 999) / 1000) + GRACE_MS
  if not known then
    ms = max(ms, redis.call('PTTL', v.hk))
  end
  if v.a ~= v.orig_a then
    -- Another algorithm's fields go.
    redis.call('DEL', v.hk)
  end
  local args = { 'a', v.a, 'b', fmt(v.b) }
  for k, x in pairs(v.s) do
    if type(x) == 'number' then
      args[#args + 1] = k
      args[#args + 1] = fmt(x)
    end
  end
  redis.call('HSET', v.hk, unpack(args))
  redis.call('PEXPIRE', v.hk, fmt(ms))
  local lg = v.s.log
  if v.a == LOG and (lg.stale or lg.lo > 0 or lg.hi < lg.n or #lg.tail > 0) then
    if lg.stale then
      redis.call('DEL', v.zk)
    else
      if lg.hi < lg.n then
        redis.call('ZREMRANGEBYRANK', v.zk, lg.hi, -1)
      end
      if lg.lo > 0 then
        redis.call('ZREMRANGEBYRANK', v.zk, 0, lg.lo - 1)
      end
    end
    if #lg.tail > 0 then
      local z = {}
      for _, e in ipairs(lg.tail) do
        z[#z + 1] = fmt(e.ts)
        z[#z + 1] = fmt(e.total)
      end
      redis.call('ZADD', v.zk, unpack(z))
    end
    -- Changed by a log op of this call, so `known`; a no-op if the log is now empty.
    redis.call('PEXPIRE', v.zk, fmt(ms))
  elseif v.orig_a == LOG and v.a ~= LOG then
    redis.call('DEL', v.zk)
  end
end

---------------------------------------------------------------- main
-- One call: KEYS and ARGV as documented above. Defined once per library load (FCALL) or
-- per call (EVAL, Redis < 7), see src/storage/redis/script.rs.
local function main(KEYS, ARGV)
  if not floor then
    floor, max, min, fmod = math.floor, math.max, math.min, math.fmod
  end
  local PER_OP = 8
  local nops = (#ARGV - 2) / PER_OP
  if nops ~= floor(nops) or nops < 0 or #KEYS ~= 2 * nops then
    return redis.error_reply('ERR ratethrottle script: expected 2 + 8n ARGV and 2n KEYS')
  end

  local now = tonumber(ARGV[1]) or 0
  if now <= 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  now = min(now, MAXT)
  local counted = ARGV[2] == '1'

  local ops = {}
  for i = 1, nops do
    local j = 2 + (i - 1) * PER_OP
    local op = {
      code = tonumber(ARGV[j + 1]),
      L = tonumber(ARGV[j + 2]),
      W = tonumber(ARGV[j + 3]),
      B = tonumber(ARGV[j + 4]),
      bd = min(tonumber(ARGV[j + 5]), MAXT),
      h = tonumber(ARGV[j + 6]),
      shadow = ARGV[j + 7] == '1',
      neg = ARGV[j + 8] == '1',
      hk = KEYS[2 * i - 1],
      zk = KEYS[2 * i],
    }
    if not (op.code and ALGO[op.code] and op.L and op.W and op.W > 0 and op.B and op.bd and op.h) then
      return redis.error_reply('ERR ratethrottle script: bad op ' .. i)
    end
    ops[i] = op
  end

  -- Pass 1: every op in order.
  views, blocks_started = {}, {}
  local out = {}
  local reject = false
  for i, op in ipairs(ops) do
    local v = view(op)
    local allowed, remaining, reset, expires
    if op.neg then
      refund(v, op, now, op.h)
      allowed, remaining, reset, expires = decide(i, v, op, now, 0, counted)
    else
      allowed, remaining, reset, expires = decide(i, v, op, now, op.h, counted)
      if not allowed and not op.shadow then
        reject = true
      end
    end
    out[i] = { allowed, remaining, reset, expires }
  end

  -- Free and rejected: start again from the stored states, keep only refunds and blocks, and
  -- report the admitted ops as looks at what the counters then hold.
  if reject and not counted then
    local started = blocks_started
    views, blocks_started = {}, {}
    for i, op in ipairs(ops) do
      if op.neg then
        refund(view(op), op, now, op.h)
      elseif started[i] then
        local v = view(op)
        v.b, v.dirty = started[i], true
      end
    end
    for i, op in ipairs(ops) do
      if not op.neg and op.h > 0 and out[i][1] then
        local allowed, remaining, reset, expires = decide(i, view(op), op, now, 0, counted)
        out[i] = { allowed, remaining, reset, expires }
      end
    end
  end

  for _, v in pairs(views) do
    write(v, now)
  end

  local reply = {}
  for i = 1, nops do
    local o = out[i]
    reply[#reply + 1] = o[1] and 1 or 0
    reply[#reply + 1] = min(o[2], U32MAX)
    reply[#reply + 1] = min(max(o[3], 0), MAXT)
    reply[#reply + 1] = min(max(o[4] - now, 0), MAXT)
  end
  return reply
end
