//! A small seeded generator: reproducible initialisation and stochastic depth without
//! depending on candle's device RNG (which cannot be seeded on the CPU).

pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Jumps `n` draws ahead (the state is a counter), so that parts of one stream can be
    /// generated in parallel.
    pub fn skip(&mut self, n: u64) {
        self.state = self.state.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn normal(&mut self) -> f64 {
        // Box-Muller; 1 - u keeps the log argument in (0, 1].
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Standard normal conditioned on |x| <= bound (rejection sampling).
    pub fn truncated_normal(&mut self, bound: f64) -> f64 {
        loop {
            let x = self.normal();
            if x.abs() <= bound {
                return x;
            }
        }
    }
}

/// A step's random draws for one micro-batch: the step's seed, and the position of the
/// micro-batch's first sample in the step's batch. Draws are keyed by sample (not by position
/// in the micro-batch), so a batch split into micro-batches draws what it draws whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draws {
    pub seed: u64,
    pub first_sample: usize,
}

impl Draws {
    /// The stochastic-depth factor of sample `i` of the micro-batch in branch `branch` of
    /// `branches` (a block's attention is 2l, its MLP 2l + 1): 0 (dropped) or 1 / (1 - rate).
    pub fn drop_path(&self, i: usize, branch: usize, branches: usize, rate: f64) -> f64 {
        if rate <= 0.0 {
            return 1.0;
        }
        let mut rng = SplitMix64::new(self.seed);
        rng.skip(((self.first_sample + i) * branches + branch) as u64);
        let keep = 1.0 - rate;
        if rng.uniform() < keep {
            1.0 / keep
        } else {
            0.0
        }
    }
}
