//! A token bucket: the one pacing rule behind the relay's byte quotas and
//! the rate of an enrolled peer's requests.

use std::time::{Duration, Instant};

/// `rate` tokens per second (bytes, requests), up to `burst` saved up.
pub struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            tokens: burst as f64,
            last: Instant::now(),
            rate: rate as f64,
            burst: burst as f64,
        }
    }

    /// Takes `n` tokens; returns how long to wait before using them.
    pub fn take(&mut self, n: usize) -> Duration {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_paces_to_the_rate() {
        let mut b = Bucket::new(1000, 500);
        assert_eq!(b.take(500), Duration::ZERO);
        let wait = b.take(100);
        assert!(
            wait >= Duration::from_millis(90) && wait <= Duration::from_millis(110),
            "{wait:?}"
        );
    }
}
