//! Routes the `log` crate's records to one host-installed sink (the C callback, or the CLI's
//! stderr printer). The only global state of the library.
//!
//! Replacing or removing the sink is synchronous: [`set_sink`] returns only once every call
//! into an earlier sink made by another thread has returned, so a host may free the old
//! callback's user data as soon as `hdb_set_log_callback` returns. A call made from inside a
//! sink (to stop logging from the callback itself) cannot wait for the call it is part of, so
//! it does not wait at all; the header says so. A sink is dropped (running the destructor of
//! the host's user data, `hdb_set_log_callback_ex`) by whoever lets go of it last: the
//! replacing [`set_sink`] when it waited, otherwise the last call into it to return.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};

use log::{LevelFilter, Log, Metadata, Record};

/// Receives (level, target module, message).
pub type Sink = Box<dyn Fn(log::Level, &str, &str) + Send + Sync>;

struct State {
    sink: Option<Arc<Sink>>,
    /// Incremented by every [`set_sink`]; a call into a sink carries the generation it was
    /// installed in.
    generation: u64,
    /// Calls in flight per generation (entries removed at zero).
    in_flight: BTreeMap<u64, usize>,
}

static STATE: Mutex<State> = Mutex::new(State {
    sink: None,
    generation: 0,
    in_flight: BTreeMap::new(),
});
/// Signalled whenever a call into a sink returns.
static IDLE: Condvar = Condvar::new();
static INSTALL: Once = Once::new();

thread_local! {
    /// How many sink calls this thread is inside (a sink may log, or call set_sink).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// The state, even if a panic elsewhere poisoned the lock (its data stays consistent: every
/// update is a single assignment or counter step).
fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks one call into the sink of `generation` as finished, also when the sink panics.
struct InFlight(u64);

impl Drop for InFlight {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        let mut s = state();
        if let Some(n) = s.in_flight.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.0);
            }
        }
        drop(s);
        IDLE.notify_all();
    }
}

struct Router;

static ROUTER: Router = Router;

impl Log for Router {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // `sink` is bound after `_done`, so it is dropped first (also when unwinding): this
        // call lets go of the sink before it counts out, so a set_sink waiting for it holds
        // the last clone and runs the sink's destructor itself, before it returns.
        let (_done, sink) = {
            let mut s = state();
            let Some(sink) = s.sink.clone() else {
                return;
            };
            let g = s.generation;
            *s.in_flight.entry(g).or_insert(0) += 1;
            DEPTH.with(|d| d.set(d.get() + 1));
            (InFlight(g), sink)
        };
        // Called with no lock held: the sink may log or call set_sink.
        sink(r.level(), r.target(), &r.args().to_string());
    }

    fn flush(&self) {}
}

/// Installs `sink` for records up to `max_level` (replacing any previous one); `None` stops
/// logging. Returns once no other thread is inside an earlier sink (immediately when called
/// from inside a sink). If another logger was installed by the host process first, it keeps
/// priority and this returns `false`.
pub fn set_sink(sink: Option<Sink>, max_level: LevelFilter) -> bool {
    INSTALL.call_once(|| {
        // Fails only if the host process installed its own `log` logger first.
        let _ = log::set_logger(&ROUTER);
    });
    let active = std::ptr::addr_eq(log::logger() as *const dyn Log, &ROUTER as *const Router);
    let level = if sink.is_some() {
        max_level
    } else {
        LevelFilter::Off
    };
    let mut s = state();
    let old = std::mem::replace(&mut s.sink, sink.map(Arc::new));
    s.generation += 1;
    let cutoff = s.generation;
    if active {
        log::set_max_level(level);
    }
    if DEPTH.with(Cell::get) == 0 {
        // Wait for the calls into earlier sinks; calls into the new one do not count.
        while s.in_flight.range(..cutoff).next().is_some() {
            s = IDLE.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
    drop(s);
    // Dropped with no lock held: dropping a sink may run the host's destructor for its user
    // data (`hdb_set_log_callback_ex`), which may log. Calls still inside it (only when this
    // runs from inside a sink) hold their own clones; the last of them to return drops it.
    drop(old);
    active
}

/// Whether the current thread is inside a sink call (for tests).
pub fn inside_sink() -> bool {
    DEPTH.with(Cell::get) > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    /// Only this test touches the global sink in the lib's unit tests.
    #[test]
    fn removing_the_sink_waits_for_calls_in_flight() {
        let entered = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicUsize::new(0));
        let (e, r, f) = (entered.clone(), release.clone(), finished.clone());
        set_sink(
            Some(Box::new(move |_, _, msg| {
                if msg == "slow" {
                    e.fetch_add(1, Ordering::SeqCst);
                    while !r.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    f.fetch_add(1, Ordering::SeqCst);
                }
            })),
            LevelFilter::Info,
        );
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| log::info!("slow")))
            .collect();
        while entered.load(Ordering::SeqCst) < 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let releaser = {
            let r = release.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                r.store(true, Ordering::SeqCst);
            })
        };
        set_sink(None, LevelFilter::Off);
        // Every call into the removed sink has returned by now.
        assert_eq!(finished.load(Ordering::SeqCst), 4);
        for t in threads {
            t.join().expect("logger thread");
        }
        releaser.join().expect("releaser");
        // A sink that stops logging from inside itself does not deadlock.
        set_sink(
            Some(Box::new(|_, _, _| {
                assert!(inside_sink());
                set_sink(None, LevelFilter::Off);
            })),
            LevelFilter::Info,
        );
        log::info!("stop from inside");
        assert!(!inside_sink());
    }
}
