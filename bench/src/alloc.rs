//! The heap allocator of the harness's process, chosen once when the process starts: the
//! system's (glibc's `malloc`) unless the environment names jemalloc.
//!
//! Why two: at 1 KB, onceflow's worker ran 17–27 % faster with jemalloc as Rust's allocator
//! (docs/benchmarks-journal.md, "Investigations"), at-least-once's was not measured the same
//! way, and an application picks its allocator, not the framework. So the harness runs the
//! at-least-once and `onceflow-100ms` workers a second time, as the modes
//! `at-least-once-jemalloc` and `onceflow-100ms-jemalloc`, with jemalloc for every Rust
//! allocation of the worker process — what an application that links `tikv-jemallocator`
//! gets — beside the same workers on the system allocator, in the same run. librdkafka's own
//! allocations stay with glibc's `malloc` either way: `tikv-jemallocator` builds jemalloc with
//! prefixed symbols.
//!
//! One binary with both, not two binaries: `cargo run -p onceflow-bench` builds only the binary
//! it runs, and the harness starts every worker from its own executable. The dispatch costs a
//! relaxed atomic load and a branch per allocator call, in every Rust mode alike (about a dozen
//! calls per record: a few nanoseconds of several microseconds).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, Ordering};

use tikv_jemallocator::Jemalloc;

/// The environment variable that selects the allocator (`jemalloc`; anything else, or unset:
/// the system's). Read once, at the process's first allocation, before `main`.
pub const ENV: &CStr = c"ONCEFLOW_BENCH_ALLOCATOR";

/// [`ENV`]'s value for jemalloc.
pub const JEMALLOC: &str = "jemalloc";

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const JEMALLOC_CHOSEN: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The process's global allocator: every call goes to the allocator chosen at the first one.
///
/// The choice never changes once made, so every block is freed or resized by the allocator
/// that allocated it.
#[derive(Debug)]
pub struct Chosen;

/// [`ENV`] as an environment variable's name, for `Command::env`.
pub fn env_name() -> &'static std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::OsStr::from_bytes(ENV.to_bytes())
}

/// The name of the allocator this process runs on.
pub fn name() -> &'static str {
    if jemalloc() { JEMALLOC } else { "system" }
}

/// Bytes the application holds from jemalloc now (jemalloc's `stats.allocated`): 0 in a
/// process on the system allocator, which never calls jemalloc. What shows that a mode's
/// worker really ran on the allocator its name says.
pub fn jemalloc_allocated_bytes() -> anyhow::Result<usize> {
    tikv_jemalloc_ctl::epoch::advance().map_err(|e| anyhow::anyhow!("jemalloc epoch: {e}"))?;
    tikv_jemalloc_ctl::stats::allocated::read()
        .map_err(|e| anyhow::anyhow!("jemalloc stats.allocated: {e}"))
}

#[inline]
fn jemalloc() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        SYSTEM => false,
        JEMALLOC_CHOSEN => true,
        _ => decide(),
    }
}

#[cold]
#[allow(
    unsafe_code,
    reason = "reading the environment without allocating, inside the allocator"
)]
fn decide() -> bool {
    // `std::env::var` allocates, and this runs inside the first allocation; `getenv` does not.
    // SAFETY: the name is a NUL-terminated literal; nothing in this process sets environment
    // variables (clippy.toml bans `set_var`), so the returned pointer, when not null, is a
    // NUL-terminated string that stays valid while it is read here.
    let chosen = unsafe {
        let value = libc::getenv(ENV.as_ptr());
        !value.is_null() && CStr::from_ptr(value).to_bytes() == JEMALLOC.as_bytes()
    };
    let choice = if chosen { JEMALLOC_CHOSEN } else { SYSTEM };
    // The first allocation is made before `main`, on the only thread; should two threads ever
    // decide at once, both read the same environment, and the first to store wins.
    match CHOICE.compare_exchange(UNDECIDED, choice, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => chosen,
        Err(earlier) => earlier == JEMALLOC_CHOSEN,
    }
}

#[allow(
    unsafe_code,
    reason = "a global allocator forwards raw allocator calls"
)]
// SAFETY: each method forwards to the allocator fixed by the first call, with the caller's
// arguments unchanged, so each block is allocated, resized and freed by one allocator, which
// upholds `GlobalAlloc`'s contract itself.
unsafe impl GlobalAlloc for Chosen {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe {
            if jemalloc() {
                Jemalloc.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe {
            if jemalloc() {
                Jemalloc.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from the one chosen, which is the one
        // called here.
        unsafe {
            if jemalloc() {
                Jemalloc.dealloc(ptr, layout);
            } else {
                System.dealloc(ptr, layout);
            }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller's contract for `realloc`, passed on.
        unsafe {
            if jemalloc() {
                Jemalloc.realloc(ptr, layout, new_size)
            } else {
                System.realloc(ptr, layout, new_size)
            }
        }
    }
}
