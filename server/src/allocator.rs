//! The process's allocator: mimalloc, set to keep freed pages mapped.
//!
//! Every layer allocates its output (megabytes at batch 8) and frees its
//! input. By default mimalloc purges freed memory by decommitting it
//! (`MADV_DONTNEED`), so a later forward pass faults the same pages back in
//! and the kernel zeroes them:
//! about 6% of a ResNet-50 forward pass on one thread here, 17,000 page
//! faults in five seconds at batch 8. Purging with a reset instead
//! (`MADV_FREE`) leaves the pages mapped: the kernel takes them back only
//! when memory runs short, and the faults drop to about 2,000.

// Every candle op allocates its output; an allocator that keeps freed
// memory avoids glibc's page faults on large buffers (3x at batch 8 here).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_decommits` in mimalloc 3's option enum (a test checks it,
/// and `PURGE_DELAY`, against their defaults).
const PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;
#[cfg(test)]
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Purge freed memory by resetting it rather than decommitting it, unless
/// the user set `MIMALLOC_PURGE_DECOMMITS`: mimalloc then reads their
/// setting itself.
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DECOMMITS").is_none() {
        // SAFETY: plain option setter; called before any thread is started.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DECOMMITS, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_numbers_match_the_linked_mimalloc() {
        // mimalloc 3's defaults: purge_decommits = 1, purge_delay = 1000 ms.
        // A reordered enum in another mimalloc version fails here, not in
        // production. (The test binary does not call keep_freed_pages.)
        if std::env::var_os("MIMALLOC_PURGE_DECOMMITS").is_none() {
            assert_eq!(
                unsafe { libmimalloc_sys::mi_option_get(PURGE_DECOMMITS) },
                1
            );
        }
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 1000);
        }
    }
}
