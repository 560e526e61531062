//! Process-wide settings for an inference process.

/// Limits glibc's malloc to two arenas. Inference threads allocate a few large activation buffers
/// per layer; with one arena per thread (glibc's default allows 8 per core) each arena keeps its
/// own freed buffers, which costs about 50 MB of resident memory for nothing on the full model.
/// No effect on other C libraries.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt is glibc's documented tuning entry point; called before any worker
        // thread exists, with a valid parameter.
        let ok = unsafe { mallopt(M_ARENA_MAX, 2) };
        if ok != 1 {
            log::debug!("mallopt(M_ARENA_MAX) was refused");
        }
    }
}

/// A flag set by SIGINT / SIGTERM (handlers installed on the first call), for work that stops
/// cleanly: the node exits, a replay finishes a valid partial output bag.
pub fn stop_flag() -> &'static std::sync::atomic::AtomicBool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    static INSTALL: std::sync::Once = std::sync::Once::new();
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::Relaxed);
    }
    INSTALL.call_once(|| {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
    });
    &STOP
}
