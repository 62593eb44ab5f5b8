//! Fixed-size summaries with known error: a Count-Min sketch (conservative update), a
//! linear-counting distinct counter, and a hash-sampled rate distribution. None grows with
//! traffic; each reports its bytes.

/// Count-Min sketch (Cormode & Muthukrishnan 2005) with conservative update (Estan & Varghese
/// 2002). An estimate is never below the true count and, with probability ≥ 1 − e^(−depth),
/// at most `e / width × total` above it ([`CountMin::error_bound`]). Keys arrive already
/// hashed (64 bits); row `i` uses bits mixed with its own odd multiplier.
#[derive(Clone)]
pub struct CountMin {
    rows: Vec<u32>,
    width_mask: usize,
    depth: usize,
    total: u64,
}

const ROW_MULT: [u64; 8] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0xD6E8_FEB8_6659_FD93,
    0xFF51_AFD7_ED55_8CCD,
    0xC4CE_B9FE_1A85_EC53,
    0x94D0_49BB_1331_11EB,
    0xBF58_476D_1CE4_E5B9,
];

impl CountMin {
    /// `width` is rounded up to a power of two; `depth` is clamped to 1..=8.
    pub fn new(width: usize, depth: usize) -> CountMin {
        let width = width.max(16).next_power_of_two();
        let depth = depth.clamp(1, ROW_MULT.len());
        CountMin {
            rows: vec![0; width * depth],
            width_mask: width - 1,
            depth,
            total: 0,
        }
    }

    #[inline]
    fn slot(&self, row: usize, hash: u64) -> usize {
        let mixed = (hash ^ (hash >> 29)).wrapping_mul(ROW_MULT[row]);
        row * (self.width_mask + 1) + ((mixed >> 32) as usize & self.width_mask)
    }

    /// Adds one and returns the new estimate.
    #[inline]
    pub fn add(&mut self, hash: u64) -> u32 {
        self.total += 1;
        let mut slots = [0usize; 8];
        let mut min = u32::MAX;
        for (row, slot) in slots.iter_mut().enumerate().take(self.depth) {
            *slot = self.slot(row, hash);
            min = min.min(self.rows[*slot]);
        }
        let new = min.saturating_add(1);
        for slot in slots.iter().take(self.depth) {
            let c = &mut self.rows[*slot];
            if *c < new {
                *c = new;
            }
        }
        new
    }

    pub fn estimate(&self, hash: u64) -> u32 {
        (0..self.depth)
            .map(|row| self.rows[self.slot(row, hash)])
            .min()
            .unwrap_or(0)
    }

    /// `e / width × total`: the overestimate bound (holds with probability ≥ 1 − e^(−depth)).
    pub fn error_bound(&self) -> u64 {
        let w = (self.width_mask + 1) as f64;
        (std::f64::consts::E / w * self.total as f64).ceil() as u64
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn clear(&mut self) {
        self.rows.fill(0);
        self.total = 0;
    }

    pub fn memory_bytes(&self) -> usize {
        self.rows.len() * 4 + std::mem::size_of::<Self>()
    }
}

/// Linear counting (Whang et al. 1990) over `64 × W` bits: distinct count of hashes, standard
/// error about `sqrt(m (e^(n/m) − n/m − 1)) / n`, good to roughly `2m` items; saturates (then
/// reports its maximum) beyond. Inline, so an exact-state entry carries it without a heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Distinct<const W: usize> {
    bits: [u64; W],
}

impl<const W: usize> Default for Distinct<W> {
    fn default() -> Self {
        Distinct { bits: [0; W] }
    }
}

impl<const W: usize> Distinct<W> {
    /// Inserts; returns true if the bit was new (a new distinct item, barring collisions).
    #[inline]
    pub fn insert(&mut self, hash: u64) -> bool {
        let m = 64 * W as u64;
        let bit = (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % m;
        let (w, b) = ((bit / 64) as usize, bit % 64);
        let new = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        new
    }

    pub fn estimate(&self) -> u64 {
        let m = (64 * W) as f64;
        let zeros = self.bits.iter().map(|w| w.count_zeros()).sum::<u32>() as f64;
        if zeros == 0.0 {
            return (m * m.ln()).round() as u64;
        }
        (-m * (zeros / m).ln()).round() as u64
    }

    pub fn clear(&mut self) {
        self.bits = [0; W];
    }
}

/// A uniform sample of the keys active in a window, chosen by hash (a key is in iff its hash
/// is below a threshold that halves whenever the sample would exceed its capacity), each
/// with its exact count in the window. Its quantiles estimate the per-key rate distribution
/// of the whole population in fixed memory.
#[derive(Clone)]
pub struct RateSample {
    counts: std::collections::HashMap<u64, u32, foldhash::fast::FixedState>,
    threshold: u64,
    capacity: usize,
}

impl RateSample {
    pub fn new(capacity: usize) -> RateSample {
        let capacity = capacity.max(16);
        RateSample {
            counts: std::collections::HashMap::with_capacity_and_hasher(
                capacity + 1,
                foldhash::fast::FixedState::with_seed(7),
            ),
            threshold: u64::MAX,
            capacity,
        }
    }

    #[inline]
    pub fn add(&mut self, hash: u64) {
        let h = hash.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (hash >> 31);
        if h > self.threshold {
            return;
        }
        *self.counts.entry(h).or_insert(0) += 1;
        if self.counts.len() > self.capacity {
            self.threshold /= 2;
            let t = self.threshold;
            self.counts.retain(|k, _| *k <= t);
        }
    }

    /// The `q`-quantile (0..=1) of the sampled keys' counts; `None` with too few keys.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.counts.len() < 20 {
            return None;
        }
        let mut v: Vec<u32> = self.counts.values().copied().collect();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        v.get(i).map(|c| f64::from(*c))
    }

    /// Sampled keys.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Starts the next window. The threshold relaxes (doubles) when the sample ran under a
    /// quarter full, so it follows the population back up after a flood.
    pub fn reset(&mut self) {
        if self.counts.len() < self.capacity / 4 {
            self.threshold = self.threshold.saturating_mul(2).max(1);
        }
        self.counts.clear();
    }

    /// Bytes at capacity (the map never holds more than `capacity + 1` entries).
    pub fn memory_bytes(&self) -> usize {
        // hashbrown: one control byte plus the (u64, u32) slot per bucket, buckets ≤ 2 × cap.
        (self.capacity + 1).next_power_of_two() * 2 * (16 + 1) + std::mem::size_of::<Self>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_min_never_underestimates_and_stays_within_its_bound() {
        let mut cm = CountMin::new(1 << 12, 4);
        for i in 0..100_000u64 {
            cm.add(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
        }
        let heavy = 42_424_242u64;
        for _ in 0..500 {
            cm.add(heavy);
        }
        let est = u64::from(cm.estimate(heavy));
        assert!(est >= 500);
        assert!(
            est <= 500 + cm.error_bound(),
            "{est} vs bound {}",
            cm.error_bound()
        );
    }

    #[test]
    fn distinct_counts_within_a_few_percent_then_saturates() {
        let mut d = Distinct::<8>::default();
        for i in 0..300u64 {
            d.insert(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
        }
        let e = d.estimate() as f64;
        assert!((e - 300.0).abs() < 30.0, "{e}");
        for i in 0..100_000u64 {
            d.insert(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
        }
        assert!(d.estimate() >= 2000);
    }

    #[test]
    fn rate_sample_stays_bounded_and_finds_the_quantile() {
        let mut s = RateSample::new(1024);
        for i in 0..1_000_000u64 {
            // key i sends (i % 100) + 1 requests' worth, spread over the stream
            let key = i % 50_000;
            if i / 50_000 <= key % 100 {
                s.add(xxhash_rust::xxh3::xxh3_64(&key.to_le_bytes()));
            }
        }
        assert!(s.len() <= 1024);
        // key k sent min(k % 100 + 1, 20) requests: 81 % of keys sent 20, 5 % sent ≤ 5
        assert_eq!(s.quantile(0.5), Some(20.0));
        let p5 = s.quantile(0.05).unwrap();
        assert!((3.0..=7.0).contains(&p5), "{p5}");
    }
}
