//! A tiny deterministic generator. `wasm32-unknown-unknown` has no entropy
//! source, so the plugin seeds it from the host clock; it only spreads the
//! starting points of workers, nothing depends on it being unpredictable.

/// SplitMix64: one multiply-xorshift step per number.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64() {
        // The reference implementation (Vigna's splitmix64.c) from seed 0.
        let mut rng = SplitMix64::new(0);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            first,
            [
                0xe220_a839_7b1d_cdaf,
                0x6e78_9e6a_a1b9_65f4,
                0x06c4_5d18_8009_454f
            ]
        );
        // The same seed, the same sequence.
        let (mut a, mut b) = (SplitMix64::new(1_234_567), SplitMix64::new(1_234_567));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
    }

    /// Workers seeded from the host clock get seeds a few nanoseconds
    /// apart: their first numbers must still differ in about half their
    /// bits, and spread evenly over starting points.
    #[test]
    fn nearby_seeds_diverge() {
        let base = 1_700_000_000_000_000_000u64;
        let first = |seed: u64| SplitMix64::new(seed).next_u64();
        let flipped: Vec<u32> = (base..base + 1000)
            .map(|seed| (first(seed) ^ first(seed + 1)).count_ones())
            .collect();
        let mean = flipped.iter().sum::<u32>() as f64 / flipped.len() as f64;
        assert!(
            (30.0..34.0).contains(&mean),
            "{mean} bits differ on average"
        );
        assert!(flipped.iter().all(|&bits| bits >= 8), "{flipped:?}");

        let mut starts = [0u32; 6];
        for seed in base..base + 600 {
            starts[(first(seed) % 6) as usize] += 1;
        }
        // 100 each on average.
        assert!(starts.iter().all(|n| (60..=140).contains(n)), "{starts:?}");
    }

    #[test]
    fn one_stream_is_spread_evenly() {
        let mut rng = SplitMix64::new(42);
        let mut buckets = [0u32; 6];
        for _ in 0..60_000 {
            buckets[(rng.next_u64() % 6) as usize] += 1;
        }
        // 10,000 each on average; one standard deviation is about 91.
        assert!(
            buckets.iter().all(|n| (9_500..=10_500).contains(n)),
            "{buckets:?}"
        );
    }
}
