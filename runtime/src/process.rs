//! How the operator and the agent start: glibc's allocator capped to two arenas, then the
//! tokio runtime.
//!
//! glibc gives each thread that meets contention an arena of its own, up to eight per core,
//! and memory freed in one is reused only there. The agent's passes allocate and drop a
//! whole desired state on whichever blocking-pool thread runs them, so freed memory piled
//! up across arenas: at 10,000 remote endpoints (`hack/bench.sh scale 0.1`) two arenas
//! took the agent from 3.4 to 2.6 KiB RSS per remote endpoint and from 94 to 76 MiB after
//! churn, at the same CPU. A `MALLOC_ARENA_MAX` set in the environment wins.

use std::future::Future;

/// Arenas when `MALLOC_ARENA_MAX` is not set.
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] unless the environment sets
/// `MALLOC_ARENA_MAX`. Call before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before other threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// Runs `main` on a multi-threaded tokio runtime, after [`limit_malloc_arenas`].
pub fn block_on<F: Future>(main: F) -> F::Output {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
        .block_on(main)
}
