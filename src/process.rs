//! Process-wide settings for an inference process.

/// Tunes glibc's malloc for an inference process:
/// - two arenas: inference threads allocate a few large activation buffers per layer; with one
///   arena per thread (glibc's default allows 8 per core) each arena keeps its own freed
///   buffers, which costs about 50 MB of resident memory for nothing on the full model;
/// - a fixed mmap threshold of 1 MiB: by default glibc raises the threshold to the size of each
///   large block freed, so the next forward's activation buffers come from the heap, which
///   fragments and does not shrink; peak RSS then grew from call to call (930 MB to 1024 MB over
///   five forwards of the full model). With the threshold fixed, every large buffer is mapped
///   and unmapped whole and the peak stays at 926 MB;
/// - a trim threshold of 8 MiB: with the mmap threshold fixed, glibc gives the free top of a
///   heap back to the kernel as soon as it exceeds 128 KiB, so the blocks below 1 MiB that a
///   forward allocates and frees again and again were faulted in anew each time (the `gemm`
///   crate allocates its packing buffers per call: the action head and the projector make
///   hundreds of calls per forward). Keeping up to 8 MiB per arena took the action head from
///   151 to 114 ms and the projector from 66 to 60 ms per forward at 1 thread (full-size
///   synthetic model, interleaved A/B), with the same peak RSS.
///
/// No effect on other C libraries.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        for (name, param, value) in [
            ("M_ARENA_MAX", M_ARENA_MAX, 2),
            ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, 1 << 20),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, 8 << 20),
        ] {
            // SAFETY: mallopt is glibc's documented tuning entry point; called before any
            // worker thread exists, with valid parameters.
            let ok = unsafe { mallopt(param, value) };
            if ok != 1 {
                log::debug!("mallopt({name}) was refused");
            }
        }
    }
}

/// Gives the pages of freed heap blocks back to the kernel (glibc's `malloc_trim`), after work
/// that allocates many small blocks and keeps only some of them. Parsing the LLaMA-3
/// `tokenizer.json` on its own thread (while the weights load) leaves its JSON tree's freed
/// blocks in that thread's arena, where nothing else reuses them. No effect on other C libraries.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; callable from any thread.
    unsafe {
        libc::malloc_trim(0);
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
