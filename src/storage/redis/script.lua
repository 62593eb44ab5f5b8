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
--
-- Stored state: hash fields a (the algorithm's code; 0 = none, only a block), b
-- (blocked_until in µs) and the algorithm's own fields (FIELDS below), each a number as
-- '%.17g' prints it (Redis 7.2+ prints integers below 1e17 the same); a write sends only the
-- fields that changed, which leaves the hash as writing them all would. sliding_window_log's
-- entries are in the zset. Malformed arguments are an error, before anything is written.
--
-- Cost: Redis's own work per call and per command dominates, so the common call (one op, or
-- ops on keys of their own; none negative, each on a blocked key, or on a fresh key or a
-- state of its own algorithm and starting no block) is decided by FAST / fast_log with plain
-- arithmetic on the values read, and every other call by the general path (ALGO on state
-- tables, a view per key of a batch), which is the reference: both give the same replies,
-- writes and TTLs.

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

-- A number as an argument of redis.call. Redis formats numbers itself, as fmt does (7.0) or as
-- the same digits (7.2+: integers), which is cheaper than formatting them here; beyond 1e17,
-- where 7.2+ would spell an integer differently, fmt keeps the stored text the same.
local function num(x)
  if x < 1e17 and x > -1e17 then
    return x
  end
  return fmt(x)
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
    local c = redis.call('ZCOUNT', lg.zk, '-inf', num(now - W))
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

---------------------------------------------------------------- reading and writing a state
-- A counter's state as a call sees it: a the algorithm (0 = fresh), b blocked_until and s the
-- algorithm's fields (the ALGO functions' state table). As read, s also holds the values of
-- its fields in its array part, s[k] for FIELDS[a][k], so that a write sends only the fields
-- that changed.

-- Each algorithm's fields in the hash, as its state table keeps them.
local FIELDS = {
  [FIXED] = { 's', 'c' },
  [LOG] = { 'd' },
  [SWC] = { 's', 'p', 'c' },
  [TOKEN] = { 'm', 'w', 't' },
  [LEAKY] = { 'm', 'w', 't' },
  [GCRA] = { 'g', 'f', 'l', 'e' },
}
-- The stored `a` of each algorithm (as written: a number sent to Redis).
local CODES = { ['0'] = 0, ['1'] = 1, ['2'] = 2, ['3'] = 3, ['4'] = 4, ['5'] = 5, ['6'] = 6 }

-- HMGET of a, b and an algorithm's fields.
local READ = {
  [FIXED] = function(k)
    return redis.call('HMGET', k, 'a', 'b', 's', 'c')
  end,
  [LOG] = function(k)
    return redis.call('HMGET', k, 'a', 'b', 'd')
  end,
  [SWC] = function(k)
    return redis.call('HMGET', k, 'a', 'b', 's', 'p', 'c')
  end,
  [GCRA] = function(k)
    return redis.call('HMGET', k, 'a', 'b', 'g', 'f', 'l', 'e')
  end,
}
local function read_bucket(k)
  return redis.call('HMGET', k, 'a', 'b', 'm', 'w', 't')
end
READ[TOKEN] = read_bucket
READ[LEAKY] = read_bucket

-- The state table from a READ reply, built whole (no rehash while it fills).
local STATE = {
  [FIXED] = function(r)
    local s, c = tonumber(r[3]), tonumber(r[4])
    return { s = s, c = c, s, c }
  end,
  [LOG] = function(r)
    local d = tonumber(r[3])
    return { d = d, d }
  end,
  [SWC] = function(r)
    local s, p, c = tonumber(r[3]), tonumber(r[4]), tonumber(r[5])
    return { s = s, p = p, c = c, s, p, c }
  end,
  [GCRA] = function(r)
    local g, f, l, e = tonumber(r[3]), tonumber(r[4]), tonumber(r[5]), tonumber(r[6])
    return { g = g, f = f, l = l, e = e, g, f, l, e }
  end,
}
local function bucket_state(r)
  local m, w, t = tonumber(r[3]), tonumber(r[4]), tonumber(r[5])
  return { m = m, w = w, t = t, m, w, t }
end
STATE[TOKEN] = bucket_state
STATE[LEAKY] = bucket_state

-- Reads the state of hash hk (log zset zk) for an op of algorithm `code` (r: its READ reply,
-- if done). Returns a, b as stored (nil if the hash does not exist) and s.
local function load(hk, zk, code, r)
  r = r or READ[code](hk)
  local a = r[1]
  a = a and (CODES[a] or tonumber(a)) or 0
  local s
  if a == code or a == 0 then
    s = STATE[code](r)
  elseif READ[a] then
    -- Another algorithm's state: its own fields.
    r = READ[a](hk)
    s = STATE[a](r)
  else
    s = {}
  end
  if a == LOG then
    s.log = log_new(zk, redis.call('ZCARD', zk), false)
  end
  local b = r[2]
  if b == '0' then
    return a, 0, s
  end
  return a, tonumber(b), s
end

-- HSET arguments, reused from call to call (only [1, n] of a call is sent).
local hset = {}

-- Writes a changed state: algorithm a (orig_a as read), blocked_until b (ob as read, nil if
-- the hash did not exist), s; lim the op whose limit the state follows, if this call knows
-- it. Sends the fields that changed (all of them when the algorithm changed, which deletes
-- the other's fields first). The TTL is the state's remaining life + GRACE_MS when the state
-- is one this call knows the limit of; a block on another algorithm's state only lengthens
-- the TTL, which still covers that state.
local function store(hk, zk, a, orig_a, b, ob, s, lim, now)
  local known = a == 0 or (lim ~= nil and lim.code == a)
  local expiry = b
  if known and a ~= 0 then
    local x = ALGO[a].expires(lim, s, now)
    if x > expiry then
      expiry = x
    end
  end
  expiry = expiry - now
  if expiry < 0 then
    expiry = 0
  elseif expiry > MAXT then
    expiry = MAXT
  end
  local ms = floor((expiry + 999) / 1000) + GRACE_MS
  if not known then
    ms = max(ms, redis.call('PTTL', hk))
  end
  local n, changed = 0, a ~= orig_a
  if changed then
    -- Another algorithm's fields go.
    redis.call('DEL', hk)
    ob = nil
  end
  if ob == nil then
    hset[1], hset[2], hset[3], hset[4], n = 'a', a, 'b', b, 4
  elseif b ~= ob then
    hset[1], hset[2], n = 'b', b, 2
  end
  local fields = FIELDS[a]
  if fields then
    for k = 1, #fields do
      local f = fields[k]
      local x = s[f]
      if x ~= nil and (changed or x ~= s[k]) then
        hset[n + 1] = f
        hset[n + 2] = num(x)
        n = n + 2
      end
    end
  end
  if n > 0 then
    redis.call('HSET', hk, unpack(hset, 1, n))
  end
  redis.call('PEXPIRE', hk, ms)
  if a == LOG then
    local lg = s.log
    if lg.stale or lg.lo > 0 or lg.hi < lg.n or #lg.tail > 0 then
      if lg.stale then
        redis.call('DEL', zk)
      else
        if lg.hi < lg.n then
          redis.call('ZREMRANGEBYRANK', zk, lg.hi, -1)
        end
        if lg.lo > 0 then
          redis.call('ZREMRANGEBYRANK', zk, 0, lg.lo - 1)
        end
      end
      local tail = lg.tail
      if #tail > 0 then
        local z = {}
        for i = 1, #tail do
          local e = tail[i]
          z[2 * i - 1] = num(e.ts)
          z[2 * i] = num(e.total)
        end
        redis.call('ZADD', zk, unpack(z))
      end
      -- Changed by a log op of this call, so `known`; a no-op if the log is now empty.
      redis.call('PEXPIRE', zk, ms)
    end
  elseif orig_a == LOG then
    redis.call('DEL', zk)
  end
end

---------------------------------------------------------------- one op on a state
local function admits_nothing(op)
  return op.L == 0 or (op.B == 0 and op.code >= TOKEN)
end

-- When the algorithm part of state (a, s) becomes equivalent to a fresh one, for outcomes
-- that do not run the algorithm (Limit::algo_expires_at).
local function algo_expires(a, s, op, now)
  if admits_nothing(op) then
    return now
  end
  if a == op.code then
    return ALGO[a].expires(op, s, now)
  end
  if op.code == FIXED or op.code == SWC then
    return ALGO[op.code].expires(op, {}, now)
  end
  return now
end

-- Limit::check_and_update on state (a, b, s). Returns allowed, remaining, reset_after,
-- expires_at, then the state after it (a, s, b; s is changed in place when the algorithm is
-- a's), `follows` (the state follows op's limit from now on), `recorded` (a and s changed)
-- and `blocked` (a block started: b changed).
local function check(op, a, b, s, now, h, counted)
  if now < b then
    return false, 0, b - now, max(algo_expires(a, s, op, now), b), a, s, b, false, false, false
  end
  local code = op.code
  local allowed, remaining, reset, expires
  local follows, recorded = false, false
  if admits_nothing(op) then
    allowed, remaining, expires = h == 0, 0, now
    if code == FIXED or code == SWC then
      reset = op.W - fmod(now, op.W)
    else
      reset = op.W
    end
  else
    local st = s
    if a ~= code then
      -- Another algorithm's state (or none): decide on a fresh one, kept only if recorded.
      st = {}
      if code == LOG then
        st.log = log_new(op.zk, 0, true)
      end
    else
      follows = true
    end
    allowed, remaining, reset, expires, recorded = ALGO[code].check(op, st, now, h, counted)
    if recorded then
      a, s, follows = code, st, true
    end
  end
  if not allowed and h > 0 and op.bd > 0 then
    b = min(now + op.bd, MAXT)
    return false, 0, max(reset, op.bd), max(expires, b), a, s, b, follows, recorded, true
  end
  return allowed, remaining, reset, expires, a, s, b, follows, recorded, false
end

-- Limit::refund on state (a, s), in place. Returns whether it applied: a state of another
-- algorithm is left alone.
local function refund(op, a, s, now, h)
  if h == 0 or admits_nothing(op) or a ~= op.code then
    return false
  end
  ALGO[a].refund(op, s, now, h)
  return true
end

---------------------------------------------------------------- one op, the general way
-- A call of one op, without the batch's bookkeeping: the op decides alone, and its rejection
-- rolls nothing back (it recorded nothing, and the replay would start the same block), except
-- that the rolled-back state follows no limit then (see the batch below).
local OP = {}

local function single(KEYS, ARGV, now, counted, r)
  local code, W = ARGV[3] + 0, ARGV[5] + 0
  if not (ALGO[code] and W > 0) then
    return redis.error_reply('ERR ratethrottle script: bad op 1')
  end
  local op, hk, zk = OP, KEYS[1], KEYS[2]
  op.code, op.L, op.W, op.B = code, ARGV[4] + 0, W, ARGV[6] + 0
  op.bd, op.zk = min(ARGV[7] + 0, MAXT), zk
  local h = ARGV[8] + 0

  local a, ob, s = load(hk, zk, code, r)
  local orig, b = a, ob or 0
  local lim, dirty = nil, false
  local neg = ARGV[10] == '1'
  if neg then
    if refund(op, a, s, now, h) then
      lim, dirty = op, true
    end
    h = 0
  end
  local allowed, remaining, reset, expires, follows, recorded, blocked
  allowed, remaining, reset, expires, a, s, b, follows, recorded, blocked =
    check(op, a, b, s, now, h, counted)
  if recorded or blocked then
    dirty = true
  end
  if follows then
    lim = op
  end
  if not allowed and not neg and not counted and ARGV[9] ~= '1' then
    -- Rolled back: a rejected op records nothing with Free, the replay starts the same block,
    -- and no refund sets the limit the state follows (see the batch below).
    lim = nil
  end
  if dirty then
    store(hk, zk, a, orig, b, ob, s, lim, now)
  end
  if remaining > U32MAX then
    remaining = U32MAX
  end
  if reset < 0 then
    reset = 0
  elseif reset > MAXT then
    reset = MAXT
  end
  expires = expires - now
  if expires < 0 then
    expires = 0
  elseif expires > MAXT then
    expires = MAXT
  end
  return { allowed and 1 or 0, remaining, reset, expires }
end

---------------------------------------------------------------- the common case, directly
-- The common op: not negative, admitting something, and either on a blocked key (nothing
-- changes) or on a fresh key or a state of its own algorithm (a bucket kept in the op's unit,
-- a GCRA TAT kept for the op's rate) and starting no block. FAST[code] decides it with the
-- arithmetic of ALGO[code].check (and algo_expires), without the tables and calls of the
-- general path. Arguments: r the READ reply of the op's hash (a state's fields are all there,
-- written together, and converted by arithmetic), the op at ARGV[j + 1 .. j + 8], hits h (0
-- for a look), buf for the HSET arguments. Returns nil in any other case (nothing done: the
-- general path takes over), else allowed, remaining, reset_after and expires_in as replied,
-- then, when the op records, the write `store` would do: HSET arguments buf[1 .. n] (the
-- fields that changed; none when, beyond the exact range, a hit is lost to rounding) and the
-- PEXPIRE in ms (nil: no write). The expiry is the one ALGO[code].expires gives after the
-- check (a block, which has ended, adds nothing).
local FAST = {}

-- The PEXPIRE of a state that lives until `expiry` (>= now).
local function ttl_ms(expiry, now)
  expiry = expiry - now
  if expiry > MAXT then
    expiry = MAXT
  end
  return floor((expiry + 999) / 1000) + GRACE_MS
end

-- b as read: a number, false if absent, nil if unreadable (not the common case).
local function read_b(b)
  if b == '0' then
    return 0
  end
  return b and tonumber(b)
end

-- The outcome for a key blocked until b: nothing changes. `algo` is when the state of the
-- algorithm becomes equivalent to a fresh one (algo_expires).
local function blocked(now, b, algo)
  if algo < b then
    algo = b
  end
  algo = algo - now
  if algo > MAXT then
    algo = MAXT
  end
  return false, 0, b - now, algo, 0, nil
end

FAST[FIXED] = function(r, ARGV, j, now, counted, h, buf)
  local L, W = ARGV[j + 2] + 0, ARGV[j + 3] + 0
  local a, b = r[1], read_b(r[2])
  if b == nil or L == 0 or not (W > 0) then
    return nil
  end
  if b and now < b then
    local at = 0
    if a == '1' then
      at = r[3] + 0
    end
    if at < now then
      at = now
    end
    return blocked(now, b, at - fmod(at, W) + W)
  end
  if a ~= '1' and (a or b) then
    return nil
  end
  local start, count = 0, 0
  if a then
    start, count = r[3] + 0, r[4] + 0
  end
  local at = now
  if start > now then
    at = start
  end
  local ws = at - fmod(at, W)
  if ws ~= start then
    count = 0
  end
  local after = count + h
  local allowed = after <= L
  local remaining = L - count
  local n, ms = 0, nil
  if h > 0 then
    if not allowed and ARGV[j + 5] ~= '0' then
      return nil
    end
    if allowed or counted then
      remaining = L - after
      if not a then
        buf[1], buf[2], buf[3], buf[4] = 'a', FIXED, 'b', 0
        buf[5], buf[6], buf[7], buf[8], n = 's', ws, 'c', num(after), 8
      elseif ws ~= start then
        buf[1], buf[2], buf[3], buf[4], n = 's', ws, 'c', num(after), 4
      else
        buf[1], buf[2], n = 'c', num(after), 2
      end
      ms = ttl_ms(ws + W, now)
    end
  end
  if remaining < 0 then
    remaining = 0
  elseif remaining > U32MAX then
    remaining = U32MAX
  end
  local reset = ws + W - now
  if reset > MAXT then
    reset = MAXT
  end
  return allowed, remaining, reset, reset, n, ms
end

-- sliding_window_counter: the expiry is the end of the window after the current one.
FAST[SWC] = function(r, ARGV, j, now, counted, h, buf)
  local L, W = ARGV[j + 2] + 0, ARGV[j + 3] + 0
  local a, b = r[1], read_b(r[2])
  if b == nil or L == 0 or not (W > 0) then
    return nil
  end
  if b and now < b then
    local at = 0
    if a == '3' then
      at = r[3] + 0
    end
    if at < now then
      at = now
    end
    return blocked(now, b, at - fmod(at, W) + 2 * W)
  end
  if a ~= '3' and (a or b) then
    return nil
  end
  local start, op, oc = 0, 0, 0
  if a then
    start, op, oc = r[3] + 0, r[4] + 0, r[5] + 0
  end
  local at = now
  if start > now then
    at = start
  end
  local ws = at - fmod(at, W)
  local d = ws - start
  local p, c = 0, 0
  if d == 0 then
    p, c = op, oc
  elseif d == W then
    p = oc
  end
  local elapsed = at - ws
  local cap = L * W
  local allowed = p * (W - elapsed) + c * W + h * W <= cap
  local n, ms = 0, nil
  if h > 0 then
    if not allowed and ARGV[j + 5] ~= '0' then
      return nil
    end
    if allowed or counted then
      c = c + h
      if not a then
        buf[1], buf[2], buf[3], buf[4], buf[5], buf[6] = 'a', SWC, 'b', 0, 's', ws
        buf[7], buf[8], buf[9], buf[10], n = 'p', num(p), 'c', num(c), 10
      else
        if ws ~= start then
          buf[1], buf[2], n = 's', ws, 2
        end
        if p ~= op then
          buf[n + 1] = 'p'
          buf[n + 2] = num(p)
          n = n + 2
        end
        if c ~= oc then
          buf[n + 1] = 'c'
          buf[n + 2] = num(c)
          n = n + 2
        end
      end
      ms = ttl_ms(ws + 2 * W, now)
    end
  end
  local slack = cap - (p * (W - elapsed) + c * W)
  if slack < 0 then
    slack = 0
  end
  local remaining = idiv(slack, W)
  local reset = 0
  if remaining < L then
    reset = (at - now) + swc_time_to_grow(W, L, p, c, elapsed, remaining)
    if reset > MAXT then
      reset = MAXT
    end
  end
  if remaining > U32MAX then
    remaining = U32MAX
  end
  local expires = ws + 2 * W - now
  if expires > MAXT then
    expires = MAXT
  end
  return allowed, remaining, reset, expires, n, ms
end

-- token_bucket and leaky_bucket, in the op's unit: the rate is L units per µs, and the expiry
-- at + ceil(level / L).
local function fast_bucket(r, ARGV, j, now, counted, h, buf)
  local L, W, B = ARGV[j + 2] + 0, ARGV[j + 3] + 0, ARGV[j + 4] + 0
  local a, b = r[1], read_b(r[2])
  if b == nil or L == 0 or B == 0 or not (W > 0) then
    return nil
  end
  local mine = a == ARGV[j + 1]
  if not mine and (a or b) and not (b and now < b) then
    return nil
  end
  local m, w, t = 0, 0, 0
  if mine then
    m, w, t = r[3] + 0, r[4] + 0, r[5] + 0
  end
  local level = m
  if w == 0 then
    level = 0
  elseif w ~= W and m ~= 0 then
    -- Kept in another unit: the general path rescales it.
    return nil
  end
  local at = now
  if t > now then
    at = t
  end
  level = level - (at - t) * L
  if level < 0 then
    level = 0
  end
  if b and now < b then
    if mine then
      return blocked(now, b, at + ceildiv(level, L))
    end
    return blocked(now, b, now)
  end
  local cap = B * W
  local allowed = level + h * W <= cap
  local n, ms = 0, nil
  if h > 0 then
    if not allowed and ARGV[j + 5] ~= '0' then
      return nil
    end
    if allowed or counted then
      level = level + h * W
      if not a then
        buf[1], buf[2], buf[3], buf[4] = 'a', ARGV[j + 1] + 0, 'b', 0
        buf[5], buf[6] = 'm', num(level)
        buf[7], buf[8], buf[9], buf[10], n = 'w', W, 't', at, 10
      else
        if level ~= m then
          buf[1], buf[2], n = 'm', num(level), 2
        end
        if W ~= w then
          buf[n + 1] = 'w'
          buf[n + 2] = W
          n = n + 2
        end
        if at ~= t then
          buf[n + 1] = 't'
          buf[n + 2] = at
          n = n + 2
        end
      end
      ms = ttl_ms(at + ceildiv(level, L), now)
    end
  end
  local remaining = cap - level
  if remaining < 0 then
    remaining = 0
  end
  remaining = idiv(remaining, W)
  local reset = 0
  if remaining < 1 then
    reset = (at - now) + ceildiv(level - (cap - W), L)
    if reset > MAXT then
      reset = MAXT
    end
  elseif remaining > U32MAX then
    remaining = U32MAX
  end
  local expires = at + ceildiv(level, L) - now
  if expires > MAXT then
    expires = MAXT
  end
  return allowed, remaining, reset, expires, n, ms
end
FAST[TOKEN] = fast_bucket
FAST[LEAKY] = fast_bucket

-- gcra, with the TAT kept for the op's L: the expiry is the TAT rounded up.
FAST[GCRA] = function(r, ARGV, j, now, counted, h, buf)
  local L, W, B = ARGV[j + 2] + 0, ARGV[j + 3] + 0, ARGV[j + 4] + 0
  local a, b = r[1], read_b(r[2])
  if b == nil or L == 0 or B == 0 or not (W > 0) then
    return nil
  end
  local mine = a == '6'
  if b and now < b then
    if not mine then
      return blocked(now, b, now)
    end
  elseif not mine and (a or b) then
    return nil
  end
  local g, f, e = 0, 0, 0
  if mine then
    if r[5] + 0 ~= L then
      -- Kept for another rate: the general path rescales it.
      return nil
    end
    g, f, e = r[3] + 0, r[4] + 0, r[6] + 0
    if b and now < b then
      if f > 0 then
        return blocked(now, b, g + 1)
      end
      return blocked(now, b, g)
    end
  end
  local ahead = (g - now) * L + f
  local pushed = ahead
  if pushed < 0 then
    pushed = 0
  end
  pushed = pushed + h * W
  local tol = B * W
  local allowed = pushed <= tol
  local n, ms = 0, nil
  if h > 0 then
    if not allowed and ARGV[j + 5] ~= '0' then
      return nil
    end
    if allowed or counted then
      local og, of, oe = g, f, e
      if ahead <= 0 then
        e = 0
      end
      ahead = pushed
      local q = idiv(pushed, L)
      g, f = now + q, pushed - q * L
      if not a then
        buf[1], buf[2], buf[3], buf[4], buf[5], buf[6] = 'a', GCRA, 'b', 0, 'g', num(g)
        buf[7], buf[8], buf[9], buf[10], buf[11], buf[12], n = 'f', num(f), 'l', L, 'e', e, 12
      else
        if g ~= og then
          buf[1], buf[2], n = 'g', num(g), 2
        end
        if f ~= of then
          buf[n + 1] = 'f'
          buf[n + 2] = num(f)
          n = n + 2
        end
        if e ~= oe then
          buf[n + 1] = 'e'
          buf[n + 2] = e
          n = n + 2
        end
      end
      if f > 0 then
        ms = ttl_ms(g + 1, now)
      else
        ms = ttl_ms(g, now)
      end
    end
  end
  if ahead < 0 then
    ahead = 0
  end
  local remaining = tol - ahead
  if remaining < 0 then
    remaining = 0
  end
  remaining = idiv(remaining, W)
  local reset = 0
  if remaining < 1 then
    reset = ceildiv(ahead - (tol - W), L)
    if reset > MAXT then
      reset = MAXT
    end
  elseif remaining > U32MAX then
    remaining = U32MAX
  end
  local expires = g
  if f > 0 then
    expires = g + 1
  end
  expires = expires - now
  if expires < 0 then
    expires = 0
  elseif expires > MAXT then
    expires = MAXT
  end
  return allowed, remaining, reset, expires, n, ms
end

-- sliding_window_log, as ALGO[LOG].check, for a call of one common op (see FAST): the log's
-- entries are read where needed, and written as `store` writes the overlay of the general
-- path. Returns the reply, else nil and the READ reply, having written nothing.
local function fast_log(KEYS, ARGV, now, counted)
  local L, W, h = ARGV[4] + 0, ARGV[5] + 0, ARGV[8] + 0
  local hk, zk = KEYS[1], KEYS[2]
  local r = redis.call('HMGET', hk, 'a', 'b', 'd')
  local a, b = r[1], read_b(r[2])
  if b == nil or L == 0 or not (W > 0) then
    return nil, r
  end
  if b and now < b then
    local algo = now
    if a == '2' then
      local N = redis.call('ZCARD', zk)
      if N > 0 then
        algo = redis.call('ZRANGE', zk, N - 1, N - 1, 'WITHSCORES')[2] + W
      end
    end
    local _, _, reset, expires = blocked(now, b, algo)
    return { 0, 0, reset, expires }
  end
  if a ~= '2' and (a or b) then
    return nil, r
  end
  -- The log as stored: N entries; a fresh state starts an empty one (deleting a zset left by
  -- an earlier life of the key when written).
  local d, N = 0, 0
  if a then
    d, N = r[3] + 0, redis.call('ZCARD', zk)
  end
  -- n entries have left the window; `before` is the running total before the first live one.
  local n, before = 0, d
  local newest_ts, newest_total = 0, d
  if N > 0 then
    n = redis.call('ZCOUNT', zk, '-inf', num(now - W))
    if n > N then
      n = N
    end
    local e = redis.call('ZRANGE', zk, N - 1, N - 1, 'WITHSCORES')
    newest_ts, newest_total = e[2] + 0, e[1] + 0
    if n == N then
      before = newest_total
    elseif n > 0 then
      before = redis.call('ZRANGE', zk, n - 1, n - 1, 'WITHSCORES')[1] + 0
    end
  end
  local live = newest_total - before
  local allowed = live + h <= L
  local used = live
  local reset, expires = 0, now
  if h > 0 and not allowed and ARGV[7] ~= '0' then
    -- A block starts: the general path, before anything is written.
    return nil, r
  end
  if h > 0 and (allowed or counted) then
    used = live + h
    -- Drop the n expired entries; fold into the newest entry (same instant, or a clock that
    -- stepped back) or append one.
    local total = before + h
    local hi, ts = N, now
    if N - n > 0 then
      total = newest_total + h
      if now <= newest_ts then
        hi, ts = N - 1, newest_ts
      end
    end
    local first = ts
    if hi > n then
      first = redis.call('ZRANGE', zk, n, n, 'WITHSCORES')[2] + 0
    end
    reset = first + W - now
    expires = ts + W
    if expires < now then
      expires = now
    end
    local ms = ttl_ms(expires, now)
    if not a then
      redis.call('HSET', hk, 'a', LOG, 'b', 0, 'd', num(before))
    elseif before ~= d then
      redis.call('HSET', hk, 'd', num(before))
    end
    redis.call('PEXPIRE', hk, ms)
    if not a then
      redis.call('DEL', zk)
    else
      if hi < N then
        redis.call('ZREMRANGEBYRANK', zk, hi, -1)
      end
      if n > 0 then
        redis.call('ZREMRANGEBYRANK', zk, 0, n - 1)
      end
    end
    redis.call('ZADD', zk, num(ts), num(total))
    redis.call('PEXPIRE', zk, ms)
  elseif n < N then
    reset = redis.call('ZRANGE', zk, n, n, 'WITHSCORES')[2] + 0 + W - now
    expires = newest_ts + W
    if expires < now then
      expires = now
    end
  end
  used = L - used
  if used < 0 then
    used = 0
  elseif used > U32MAX then
    used = U32MAX
  end
  if reset < 0 then
    reset = 0
  elseif reset > MAXT then
    reset = MAXT
  end
  expires = expires - now
  if expires > MAXT then
    expires = MAXT
  end
  return { allowed and 1 or 0, used, reset, expires }
end

---------------------------------------------------------------- a batch
-- Tables reused from call to call (a function library keeps them; each call sets what it
-- reads), as building them anew is much of the cost of a batch: OPS[i] the ops, VIEWS[1 ..
-- nviews] a view of each key the batch has read, STARTED[i] the block op i started (false if
-- none). A view: one counter's state as the batch sees it (see `load`), v.orig_a and v.ob its
-- algorithm and blocked_until as read, v.lim the op whose limit the state follows (v.rlim: the
-- same as far as refunds set it), v.dirty whether it must be written.
local OPS, VIEWS, STARTED = {}, {}, {}
local nviews, recorded_any

-- The view of op's key (r: its READ reply for op, if done).
local function view(op, r)
  local hk = op.hk
  for k = 1, nviews do
    local v = VIEWS[k]
    if v.hk == hk then
      return v
    end
  end
  local a, ob, s = load(hk, op.zk, op.code, r)
  nviews = nviews + 1
  local v = VIEWS[nviews]
  if not v then
    v = {}
    VIEWS[nviews] = v
  end
  v.hk, v.zk, v.a, v.orig_a, v.b, v.ob, v.s = hk, op.zk, a, a, ob or 0, ob, s
  v.dirty, v.lim, v.rlim = false, nil, nil
  return v
end

-- check on a view. Returns allowed, remaining, reset_after, expires_at.
local function decide(i, v, op, now, h, counted)
  local allowed, remaining, reset, expires, a, s, b, follows, recorded, blocked =
    check(op, v.a, v.b, v.s, now, h, counted)
  if follows then
    v.lim = op
  end
  if recorded then
    v.a, v.s, v.dirty = a, s, true
    recorded_any = true
  end
  if blocked then
    v.b, v.dirty = b, true
    STARTED[i] = b
  end
  return allowed, remaining, reset, expires
end

local function refund_view(v, op, now, h)
  if refund(op, v.a, v.s, now, h) then
    v.lim, v.rlim, v.dirty = op, op, true
  end
end

local function put(reply, i, now, allowed, remaining, reset, expires)
  local k = 4 * i
  reply[k - 3] = allowed and 1 or 0
  reply[k - 2] = min(remaining, U32MAX)
  reply[k - 1] = min(max(reset, 0), MAXT)
  reply[k] = min(max(expires - now, 0), MAXT)
end

-- reads: READ replies of ops 1 .. nread, done by fast_batch.
local function batch(KEYS, ARGV, nops, now, counted, reads, nread)
  for i = 1, nops do
    local j = 8 * i - 6
    local code, W = ARGV[j + 1] + 0, ARGV[j + 3] + 0
    if not (ALGO[code] and W > 0) then
      return redis.error_reply('ERR ratethrottle script: bad op ' .. i)
    end
    local op = OPS[i]
    if not op then
      op = {}
      OPS[i] = op
    end
    op.code, op.L, op.W, op.B = code, ARGV[j + 2] + 0, W, ARGV[j + 4] + 0
    op.bd, op.h = min(ARGV[j + 5] + 0, MAXT), ARGV[j + 6] + 0
    op.shadow, op.neg = ARGV[j + 7] == '1', ARGV[j + 8] == '1'
    op.hk, op.zk = KEYS[2 * i - 1], KEYS[2 * i]
    STARTED[i] = false
  end

  -- Pass 1: every op in order.
  nviews, recorded_any = 0, false
  local reply = {}
  local reject = false
  for i = 1, nops do
    local op = OPS[i]
    local v = view(op, i <= nread and reads[i] or nil)
    if op.neg then
      refund_view(v, op, now, op.h)
      put(reply, i, now, decide(i, v, op, now, 0, counted))
    else
      local allowed, remaining, reset, expires = decide(i, v, op, now, op.h, counted)
      if not allowed and not op.shadow then
        reject = true
      end
      put(reply, i, now, allowed, remaining, reset, expires)
    end
  end

  -- Free and rejected: start again from the stored states, keep only refunds and blocks, and
  -- report the admitted ops as looks at what the counters then hold.
  if reject and not counted then
    if recorded_any then
      nviews = 0
      for i = 1, nops do
        local op = OPS[i]
        if op.neg then
          refund_view(view(op), op, now, op.h)
        elseif STARTED[i] then
          local v = view(op)
          v.b, v.dirty = STARTED[i], true
        end
      end
      for i = 1, nops do
        local op = OPS[i]
        if not op.neg and op.h > 0 and reply[4 * i - 3] == 1 then
          put(reply, i, now, decide(i, view(op), op, now, 0, counted))
        end
      end
    else
      -- Nothing was recorded, so pass 1 left the states as the replay would (the same refunds
      -- and blocks, in order) but for the limit they follow, which in the replay only refunds
      -- set.
      for k = 1, nviews do
        local v = VIEWS[k]
        v.lim = v.rlim
      end
    end
  end

  for k = 1, nviews do
    local v = VIEWS[k]
    if v.dirty then
      store(v.hk, v.zk, v.a, v.orig_a, v.b, v.ob, v.s, v.lim, now)
    end
  end
  return reply
end

---------------------------------------------------------------- a batch of common ops
-- Every op common (see FAST) and on a key of its own: the ops are independent, and no op
-- refunds or starts a block, so a rollback discards every write, and the ops it reports as
-- looks see the states as read. Returns nil, having written nothing, if an op is not common
-- (what the arguments tell is seen before anything is read), and how many ops' hashes it
-- read (into READS): the general batch then decides the call.
local BUFS, READS, NS, MSS = {}, {}, {}, {}

local function fast_batch(KEYS, ARGV, nops, now, counted)
  for i = 1, nops do
    local j = 8 * i - 6
    local code = ARGV[j + 1] + 0
    if not FAST[code] or ARGV[j + 8] ~= '0' or ARGV[j + 2] == '0' then
      return nil, 0
    end
    if code >= TOKEN and ARGV[j + 4] == '0' then
      return nil, 0
    end
    local hk = KEYS[2 * i - 1]
    for k = 1, i - 1 do
      if KEYS[2 * k - 1] == hk then
        return nil, 0
      end
    end
  end
  local reply = {}
  local reject = false
  for i = 1, nops do
    local j = 8 * i - 6
    local code = ARGV[j + 1] + 0
    local r = READ[code](KEYS[2 * i - 1])
    READS[i] = r
    local buf = BUFS[i]
    if not buf then
      buf = {}
      BUFS[i] = buf
    end
    local allowed, remaining, reset, expires, n, ms =
      FAST[code](r, ARGV, j, now, counted, ARGV[j + 6] + 0, buf)
    if allowed == nil then
      return nil, i
    end
    NS[i], MSS[i] = n, ms or false
    local k = 4 * i
    reply[k - 3], reply[k - 2] = allowed and 1 or 0, remaining
    reply[k - 1], reply[k] = reset, expires
    if not allowed and ARGV[j + 7] ~= '1' then
      reject = true
    end
  end
  if reject and not counted then
    for i = 1, nops do
      local j = 8 * i - 6
      if reply[4 * i - 3] == 1 and ARGV[j + 6] + 0 > 0 then
        local allowed, remaining, reset, expires =
          FAST[ARGV[j + 1] + 0](READS[i], ARGV, j, now, counted, 0, BUFS[i])
        local k = 4 * i
        reply[k - 3], reply[k - 2] = allowed and 1 or 0, remaining
        reply[k - 1], reply[k] = reset, expires
      end
    end
  else
    for i = 1, nops do
      local ms = MSS[i]
      if ms then
        local hk = KEYS[2 * i - 1]
        if NS[i] > 0 then
          redis.call('HSET', hk, unpack(BUFS[i], 1, NS[i]))
        end
        redis.call('PEXPIRE', hk, ms)
      end
    end
  end
  return reply
end

---------------------------------------------------------------- main
-- The decisions of one request, with `now` and `counted` already read from ARGV[1..2].
local function decide_request(KEYS, ARGV, nops, now, counted)
  if nops == 1 then
    local code = ARGV[3] + 0
    if code == LOG and ARGV[10] == '0' then
      local reply, r = fast_log(KEYS, ARGV, now, counted)
      if reply then
        return reply
      end
      return single(KEYS, ARGV, now, counted, r)
    end
    local fast = FAST[code]
    if fast and ARGV[10] == '0' then
      local hk = KEYS[1]
      local r = READ[code](hk)
      local allowed, remaining, reset, expires, n, ms =
        fast(r, ARGV, 2, now, counted, ARGV[8] + 0, hset)
      if allowed ~= nil then
        if ms then
          -- Beyond the exact range a recorded hit may change nothing.
          if n > 0 then
            redis.call('HSET', hk, unpack(hset, 1, n))
          end
          redis.call('PEXPIRE', hk, ms)
        end
        return { allowed and 1 or 0, remaining, reset, expires }
      end
      return single(KEYS, ARGV, now, counted, r)
    end
    return single(KEYS, ARGV, now, counted)
  end
  local reply, nread = fast_batch(KEYS, ARGV, nops, now, counted)
  if reply then
    return reply
  end
  return batch(KEYS, ARGV, nops, now, counted, READS, nread)
end

local function bind_math()
  if not floor then
    floor, max, min, fmod = math.floor, math.max, math.min, math.fmod
  end
end

local function redis_now()
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end

-- One call: KEYS and ARGV as documented above. Defined once per library load (FCALL) or
-- per call (EVAL, Redis < 7), see src/storage/redis/script.rs. Numeric arguments are
-- converted by arithmetic (cheaper than tonumber): a malformed one is a Lua error, raised
-- before anything is written.
local function main(KEYS, ARGV)
  bind_math()
  local nops = (#ARGV - 2) / 8
  if (nops ~= 1 and (nops ~= floor(nops) or nops < 0)) or #KEYS ~= 2 * nops then
    return redis.error_reply('ERR ratethrottle script: expected 2 + 8n ARGV and 2n KEYS')
  end

  local now = ARGV[1]
  if now == '0' then
    now = 0
  else
    now = tonumber(now) or 0
  end
  if now <= 0 then
    now = redis_now()
  end
  if now > MAXT then
    now = MAXT
  end
  return decide_request(KEYS, ARGV, nops, now, ARGV[2] == '1')
end

-- Batch helper: one single-op request decided by its algorithm's fast path straight from the
-- batch's ARGV (its op's arguments at ARGV[i + 1 .. i + 8], its key at ARGV[i]). Returns the
-- 4 reply integers, or nil when the fast path declines (then the general path decides).
local function fast_in_place(ARGV, i, now, counted)
  local code = ARGV[i + 1] + 0
  local fast = FAST[code]
  if code == LOG or not fast then
    return nil
  end
  local hk = ARGV[i]
  local r = READ[code](hk)
  local allowed, remaining, reset, expires, n, ms = fast(r, ARGV, i, now, counted, ARGV[i + 6] + 0, hset)
  if allowed == nil then
    return nil
  end
  if ms then
    if n > 0 then
      redis.call('HSET', hk, unpack(hset, 1, n))
    end
    redis.call('PEXPIRE', hk, ms)
  end
  return { allowed and 1 or 0, remaining, reset, expires }
end

-- Batch: fixed-window states read and changed by the fast path in this call, by hash key, so
-- a key that many requests of one batch hit (a hot API key, a flood) is read once and written
-- once — HSET of the fields that changed and the last PEXPIRE — instead of HMGET, HSET and
-- PEXPIRE per request. The end state is the one the requests would leave one by one: the
-- script runs atomically (nobody reads in between), later writes of a field replace earlier
-- ones, and the last PEXPIRE wins. Kept: r (the HMGET reply, updated as Redis would return
-- it: `a` as its string, numbers as numbers — FAST[FIXED] compares `a` with '1' and reads
-- the others by arithmetic), f (field → value to write), ms (the PEXPIRE to send).
-- Flushed (written and forgotten) before a request takes another path that may read the
-- same hashes, before an error reply, and at the end.
local FIXED_AT = { a = 1, b = 2, s = 3, c = 4 }
-- A fixed-window op's algorithm argument, as ARGV carries it.
local FIXED_CODE = '1'

local function batch_flush(cache)
  for hk, e in pairs(cache) do
    local n = 0
    for f, v in pairs(e.f) do
      hset[n + 1], hset[n + 2] = f, v
      n = n + 2
    end
    if n > 0 then
      redis.call('HSET', hk, unpack(hset, 1, n))
    end
    if e.ms then
      redis.call('PEXPIRE', hk, e.ms)
    end
  end
end

-- fast_in_place for a fixed-window op, on the batch's cached state of its key.
local function fast_fixed_cached(cache, ARGV, i, now, counted)
  local hk = ARGV[i]
  local e = cache[hk]
  if not e then
    e = { r = READ[FIXED](hk), f = {}, ms = nil }
    cache[hk] = e
  end
  local r = e.r
  local allowed, remaining, reset, expires, n, ms = FAST[FIXED](r, ARGV, i, now, counted, ARGV[i + 6] + 0, hset)
  if allowed == nil then
    return nil
  end
  if ms then
    for m = 1, n, 2 do
      local f, v = hset[m], hset[m + 1]
      e.f[f] = v
      if f == 'a' then
        v = tostring(v)
      end
      r[FIXED_AT[f]] = v
    end
    e.ms = ms
  end
  return { allowed and 1 or 0, remaining, reset, expires }
end

-- Batch helper: one request decided as main decides it, from KEYS/ARGV tables built for it.
-- Appends its reply (or its error) to out; returns the new lengths of out and the ARGV offset.
local function decide_in_table(KEYS, ARGV, out, o, i, nops, now, rejected)
  local K, A = {}, { '', rejected }
  for j = 0, nops - 1 do
    local b = i + 9 * j
    local hk = ARGV[b]
    K[2 * j + 1] = hk
    K[2 * j + 2] = hk .. ':log'
    for m = 1, 8 do
      A[2 + 8 * j + m] = ARGV[b + m]
    end
  end
  i = i + 9 * nops
  local ok, reply = pcall(decide_request, K, A, nops, now, rejected == '1')
  if ok and type(reply) == 'table' and not reply.err then
    out[o + 1] = #reply
    for m = 1, #reply do
      out[o + 1 + m] = reply[m]
    end
    o = o + 1 + #reply
  else
    local e = reply
    if type(e) == 'table' then
      e = e.err
    end
    out[o + 1] = -1
    out[o + 2] = tostring(e)
    o = o + 2
  end
  return o, i
end

---------------------------------------------------------------- main_batch
-- Many requests in one call (the store coalesces the requests in flight to one node). No
-- KEYS: the keys are in ARGV, so one call may span hash slots (the function is registered
-- with allow-cross-slot-keys; on a cluster every key must still be on this node).
-- ARGV: [1] 'B', then per request: now in µs (0 = TIME, read once per call), rejected hits
--   (0/1), n = its op count, then per op: the hash key and the op's 8 arguments as in main.
-- Requests are decided in order, each exactly as main decides it alone (all-or-nothing),
-- so a later request sees the earlier ones' effects.
-- Reply, per request: 4n (then its 4n integers as in main), or -1 then the error's text:
--   a request that fails (a wrong-type key, a malformed op) fails alone, having written
--   nothing (main reads everything before it writes), and the others are still decided.
local function main_batch(KEYS, ARGV)
  bind_math()
  local out, o = {}, 0
  local i, n = 2, #ARGV
  local clock
  local cache = {}
  while i <= n do
    local now = tonumber(ARGV[i]) or 0
    local rejected = ARGV[i + 1]
    local nops = tonumber(ARGV[i + 2]) or 0
    i = i + 3
    if nops < 1 or nops ~= floor(nops) or i + 9 * nops - 1 > n then
      batch_flush(cache)
      return redis.error_reply('ERR ratethrottle batch: malformed request at argument ' .. (i - 3))
    end
    if now <= 0 then
      clock = clock or redis_now()
      now = clock
    end
    if now > MAXT then
      now = MAXT
    end
    local reply = nil
    if nops == 1 and ARGV[i + 8] == '0' then
      -- The common request, one op: the fast path reads its arguments in place.
      local ok, r
      if ARGV[i + 1] == FIXED_CODE then
        ok, r = pcall(fast_fixed_cached, cache, ARGV, i, now, rejected == '1')
      else
        if cache[ARGV[i]] then
          batch_flush(cache)
          cache = {}
        end
        ok, r = pcall(fast_in_place, ARGV, i, now, rejected == '1')
      end
      if not ok then
        reply = r
      elseif r then
        out[o + 1] = 4
        out[o + 2], out[o + 3], out[o + 4], out[o + 5] = r[1], r[2], r[3], r[4]
        o = o + 5
        i = i + 9
        reply = true
      end
    end
    if reply == true then
      -- decided in place
    elseif reply ~= nil then
      out[o + 1] = -1
      out[o + 2] = tostring(type(reply) == 'table' and reply.err or reply)
      o = o + 2
      i = i + 9 * nops
    else
      batch_flush(cache)
      cache = {}
      o, i = decide_in_table(KEYS, ARGV, out, o, i, nops, now, rejected)
    end
  end
  batch_flush(cache)
  return out
end
