//! Rate-limited logging for messages a guest or a client can trigger.
//!
//! A guest that sends a stream of malformed requests must not be able to flood the host log.
//! Every call site of [`guest_log!`](crate::guest_log) owns one [`LogLimiter`]: it lets a burst
//! of messages through, then at most one message per refill interval, and reports how many it
//! swallowed when it lets the next one through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Messages let through at once before throttling starts.
const BURST: u64 = 10;
/// One more message is allowed per this many milliseconds.
const REFILL_MS: u64 = 1000;

/// A lock-free token bucket for one log call site.
#[derive(Debug)]
pub struct LogLimiter {
    /// Milliseconds since `epoch()` at which the bucket is considered empty again; tokens are
    /// derived from how far "now" is past this point.
    empty_at_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogLimiter {
    /// A limiter with a full bucket.
    pub const fn new() -> Self {
        LogLimiter {
            empty_at_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(n)` when a message may be logged now, `n` being the number of messages
    /// suppressed since the last one that was let through; `None` when it must be dropped.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(epoch().elapsed().as_millis() as u64 + BURST * REFILL_MS)
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let mut empty_at = self.empty_at_ms.load(Ordering::Relaxed);
        loop {
            // The bucket never holds more than BURST tokens.
            let floor = now_ms.saturating_sub(BURST * REFILL_MS);
            let start = empty_at.max(floor);
            let next = start + REFILL_MS;
            if next > now_ms {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.empty_at_ms.compare_exchange_weak(
                empty_at,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(current) => empty_at = current,
            }
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs at `level` through a per-call-site [`LogLimiter`]. Use it for every message whose
/// cause a guest or a vhost-user client controls.
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new();
        if log::log_enabled!($level) {
            if let Some(suppressed) = LIMITER.admit() {
                if suppressed > 0 {
                    log::log!($level, "{} (after {} similar messages were suppressed)",
                        format_args!($($arg)+), suppressed);
                } else {
                    log::log!($level, $($arg)+);
                }
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through_then_throttles() {
        let limiter = LogLimiter::new();
        let now = 100_000;
        let admitted = (0..100).filter(|_| limiter.admit_at(now).is_some()).count();
        assert_eq!(admitted as u64, BURST);
        // One refill interval later exactly one more message passes and reports the rest.
        assert_eq!(limiter.admit_at(now + REFILL_MS), Some(100 - BURST));
        assert_eq!(limiter.admit_at(now + REFILL_MS), None);
    }

    #[test]
    fn refills_after_a_quiet_period() {
        let limiter = LogLimiter::new();
        let now = 100_000;
        while limiter.admit_at(now).is_some() {}
        let later = now + 60 * REFILL_MS;
        let admitted = (0..100)
            .filter(|_| limiter.admit_at(later).is_some())
            .count();
        assert_eq!(admitted as u64, BURST);
    }
}
