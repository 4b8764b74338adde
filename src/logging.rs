//! Routes the `log` crate's records to one host-installed sink (the C callback, or the CLI's
//! stderr printer). The only global state of the library.

use std::sync::{Once, RwLock};

use log::{LevelFilter, Log, Metadata, Record};

/// Receives (level, target module, message).
pub type Sink = Box<dyn Fn(log::Level, &str, &str) + Send + Sync>;

static SINK: RwLock<Option<std::sync::Arc<Sink>>> = RwLock::new(None);
static INSTALL: Once = Once::new();

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
        // Call the sink with no lock held: it may itself call set_sink (e.g. to stop logging).
        let sink = SINK.read().ok().and_then(|g| g.clone());
        if let Some(sink) = sink {
            sink(r.level(), r.target(), &r.args().to_string());
        }
    }

    fn flush(&self) {}
}

/// Installs `sink` for records up to `max_level` (replacing any previous one); `None` stops
/// logging. If another logger was installed by the host process first, it keeps priority
/// and this returns `false`.
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
    if let Ok(mut guard) = SINK.write() {
        *guard = sink.map(std::sync::Arc::new);
    }
    if active {
        log::set_max_level(level);
    }
    active
}
