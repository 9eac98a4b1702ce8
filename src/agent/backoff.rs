//! Exponential backoff with full jitter for reconnects: 250 ms doubling to 30 s, each
//! delay drawn uniformly below the current cap, so many agents restarting together spread
//! out instead of knocking at once.

use std::time::Duration;

use rand::Rng;

const INITIAL_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(30);

pub struct Backoff {
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { cap: INITIAL_DELAY }
    }

    /// The next delay; the cap doubles each time.
    pub fn next_delay(&mut self) -> Duration {
        let delay = rand::thread_rng().gen_range(Duration::ZERO..=self.cap);
        self.cap = (self.cap * 2).min(MAX_DELAY);
        delay
    }

    /// After a success: start small again.
    pub fn reset(&mut self) {
        self.cap = INITIAL_DELAY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut backoff = Backoff::new();
        for _ in 0..20 {
            assert!(backoff.next_delay() <= MAX_DELAY);
        }
        assert_eq!(backoff.cap, MAX_DELAY);
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL_DELAY);
    }
}
