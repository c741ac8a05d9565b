//! A retry budget: every upstream call earns `ratio` of a retry (up to `MAX_BALANCE`), and a
//! retry spends one, so retries stay a bounded share of calls even when the upstream is down.

use parking_lot::Mutex;

/// Retries that can be saved up for a burst of failures.
const MAX_BALANCE: f64 = 10.0;
/// Retries available at start-up (a fresh proxy can retry its first connection error).
const INITIAL_BALANCE: f64 = 1.0;

#[derive(Debug)]
pub(crate) struct RetryBudget {
    balance: Mutex<f64>,
    ratio: f64,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            balance: Mutex::new(if ratio > 0.0 { INITIAL_BALANCE } else { 0.0 }),
            ratio: ratio.max(0.0),
        }
    }

    /// An original (non-retry) call was made.
    pub(crate) fn deposit(&self) {
        let mut b = self.balance.lock();
        *b = (*b + self.ratio).min(MAX_BALANCE);
    }

    /// Spends one retry if the budget has it.
    pub(crate) fn try_withdraw(&self) -> bool {
        let mut b = self.balance.lock();
        if *b >= 1.0 {
            *b -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_calls() {
        let r = RetryBudget::new(0.1);
        assert!(r.try_withdraw(), "initial balance");
        assert!(!r.try_withdraw());
        let mut granted = 0;
        for _ in 0..100 {
            r.deposit();
            if r.try_withdraw() {
                granted += 1;
            }
        }
        assert!((9..=10).contains(&granted), "{granted}");
        let none = RetryBudget::new(0.0);
        none.deposit();
        assert!(!none.try_withdraw());
    }
}
