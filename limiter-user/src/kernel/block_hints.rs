//! The prefilter of the host block tables and their generation
//! (`BLOCK_HINTS`, see `limiter_common::host_hint`), written through a
//! shared mapping of the kernel array: setting a bit is one atomic OR,
//! rebuilding both bitmaps (4 MiB) a pass over memory, with no syscall per
//! word.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use limiter_common::host_hint;

use super::KernelError;

/// Both families' bitmaps as the kernel array holds them.
pub struct Bitmaps(Vec<u64>);

/// Words of both bitmaps (the generation follows them).
const BITMAP_WORDS: usize = host_hint::GENERATION as usize;

impl Bitmaps {
    pub fn new() -> Self {
        Self(vec![0; BITMAP_WORDS])
    }

    /// Sets the bit at `position` (from `host_hint::of_v4` / `of_v6`).
    pub fn add(&mut self, (word, bit): (u32, u64)) {
        self.0[word as usize] |= bit;
    }
}

/// The kernel's `BLOCK_HINTS` array, mapped into this process.
pub struct BlockHints {
    words: NonNull<AtomicU64>,
}

// SAFETY: the mapping is shared memory accessed only through atomics, and
// it lives until `drop`.
unsafe impl Send for BlockHints {}
unsafe impl Sync for BlockHints {}

const LEN: usize = host_hint::ENTRIES as usize * size_of::<u64>();

impl BlockHints {
    /// Maps the array behind `fd` (created with `BPF_F_MMAPABLE` and
    /// [`host_hint::ENTRIES`] `u64` entries, as the kernel object declares
    /// it and the pin check requires).
    pub fn map(fd: impl AsFd) -> Result<Self, KernelError> {
        // SAFETY: a new shared mapping of a BPF array the caller owns; the
        // kernel refuses a length beyond the array.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(KernelError::Map {
                map: limiter_common::map_names::BLOCK_HINTS,
                message: format!(
                    "mapping it into memory: {} (was it created without BPF_F_MMAPABLE? remove the pin and restart the agent)",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let words = NonNull::new(address.cast()).ok_or_else(|| KernelError::Map {
            map: limiter_common::map_names::BLOCK_HINTS,
            message: "mapped at address 0".into(),
        })?;
        Ok(Self { words })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `LEN` bytes mapped at `words`, page-aligned, live until
        // drop; every access is atomic.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), host_hint::ENTRIES as usize) }
    }

    /// Sets the bit at `position`, before its address goes into its table.
    pub fn set(&self, (word, bit): (u32, u64)) {
        self.words()[word as usize].fetch_or(bit, Ordering::SeqCst);
    }

    /// Makes the bitmaps exactly `wanted`. The caller holds every writer
    /// off (the maps' lock), and `wanted` has the bit of every address in
    /// the tables.
    pub fn replace(&self, wanted: &Bitmaps) {
        for (word, want) in self.words()[..BITMAP_WORDS].iter().zip(&wanted.0) {
            if word.load(Ordering::Relaxed) != *want {
                word.store(*want, Ordering::SeqCst);
            }
        }
    }
}

impl BlockHints {
    /// Starts a new generation of the host tables, after a change that can
    /// end or shorten a block: every CPU's cached copies are stale from here.
    /// Never 0, which turns the caches off.
    pub fn next_generation(&self) {
        let generation = &self.words()[host_hint::GENERATION as usize];
        if generation.fetch_add(1, Ordering::SeqCst) == u64::MAX {
            generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for BlockHints {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.words.as_ptr().cast(), LEN) };
    }
}
