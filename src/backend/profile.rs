//! Opt-in wall-clock profile of op categories, for `hdb bench --profile`: where the time goes.
//! Off by default; when off, a scope costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());
type SyncFn = Arc<dyn Fn() + Send + Sync>;
static SYNC: Mutex<Option<SyncFn>> = Mutex::new(None);

/// Starts (or stops) collecting, clearing what was collected.
pub fn enable(on: bool) {
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
    if let Ok(mut s) = SYNC.lock() {
        *s = None;
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Starts collecting with `sync` called at each scope's start and end. A GPU's work is queued,
/// so the host's clock says nothing about it until the host has waited for the device: pass
/// the device's synchronize. Each scope then waits for the device, so a profiled run takes
/// longer than a plain one (the launch gaps are no longer hidden); the shares are what count.
pub fn enable_synced(sync: impl Fn() + Send + Sync + 'static) {
    enable(true);
    if let Ok(mut s) = SYNC.lock() {
        *s = Some(Arc::new(sync));
    }
}

fn wait_for_device() {
    let f = SYNC.lock().ok().and_then(|s| s.clone());
    if let Some(f) = f {
        f();
    }
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
    let start = ENABLED.load(Ordering::Relaxed).then(|| {
        wait_for_device();
        Instant::now()
    });
    Scope { name, start }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            wait_for_device();
            let d = s.elapsed();
            if let Ok(mut t) = TOTALS.lock() {
                let e = t.entry(self.name).or_default();
                e.0 += d;
                e.1 += 1;
            }
        }
    }
}
