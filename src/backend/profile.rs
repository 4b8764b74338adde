//! Opt-in wall-clock profile of op categories, for `hdb bench --profile`: where the time goes.
//! Off by default; when off, a scope costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Starts (or stops) collecting, clearing what was collected.
pub fn enable(on: bool) {
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Time and call count per category, most expensive first.
pub fn report() -> Vec<(&'static str, Duration, u64)> {
    let mut v: Vec<_> = TOTALS
        .lock()
        .map(|t| t.iter().map(|(k, (d, n))| (*k, *d, *n)).collect())
        .unwrap_or_default();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// Measures until dropped. Scopes must not nest (the totals would double count).
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

/// A scope for category `name`.
pub fn scope(name: &'static str) -> Scope {
    let start = ENABLED.load(Ordering::Relaxed).then(Instant::now);
    Scope { name, start }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let d = s.elapsed();
            if let Ok(mut t) = TOTALS.lock() {
                let e = t.entry(self.name).or_default();
                e.0 += d;
                e.1 += 1;
            }
        }
    }
}
