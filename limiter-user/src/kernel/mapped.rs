//! The kernel arrays the agent writes through a shared memory mapping, with
//! atomics and no syscall per word: the prefilter of the host block tables
//! (`BLOCK_HINTS`, see `limiter_common::host_hint`; rebuilding both
//! bitmaps, 4 MiB, is a pass over memory) and the generations of what the
//! programs' per-CPU caches copy (`GENERATIONS`, which the sock_ops program
//! increments too).

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use limiter_common::{generation, host_hint, map_names};

use super::KernelError;

/// A `BPF_F_MMAPABLE` array of `u64`, mapped into this process.
struct MappedWords {
    words: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics, and
// it lives until `drop`.
unsafe impl Send for MappedWords {}
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// Maps the `len` words of array `name` behind `fd` (created with
    /// `BPF_F_MMAPABLE` and `len` entries, as the kernel object declares
    /// it and the pin check requires).
    fn map(fd: impl AsFd, len: usize, name: &'static str) -> Result<Self, KernelError> {
        // SAFETY: a new shared mapping of a BPF array the caller owns; the
        // kernel refuses a length beyond the array.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * size_of::<u64>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(KernelError::Map {
                map: name,
                message: format!(
                    "mapping it into memory: {} (was it created without BPF_F_MMAPABLE? remove the pin and restart the agent)",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let words = NonNull::new(address.cast()).ok_or_else(|| KernelError::Map {
            map: name,
            message: "mapped at address 0".into(),
        })?;
        Ok(Self { words, len })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `len` words mapped at `words`, page-aligned, live until
        // drop; every access is atomic.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * size_of::<u64>()) };
    }
}

/// Both families' bitmaps as `BLOCK_HINTS` holds them.
pub struct Bitmaps(Vec<u64>);

impl Bitmaps {
    pub fn new() -> Self {
        Self(vec![0; host_hint::ENTRIES as usize])
    }

    /// Sets the bit at `position` (from `host_hint::of_v4` / `of_v6`).
    pub fn add(&mut self, (word, bit): (u32, u64)) {
        self.0[word as usize] |= bit;
    }
}

/// The kernel's `BLOCK_HINTS`.
pub struct BlockHints(MappedWords);

impl BlockHints {
    pub fn map(fd: impl AsFd) -> Result<Self, KernelError> {
        let len = host_hint::ENTRIES as usize;
        MappedWords::map(fd, len, map_names::BLOCK_HINTS).map(Self)
    }

    /// Sets the bit at `position`, before its address goes into its table.
    pub fn set(&self, (word, bit): (u32, u64)) {
        self.0.words()[word as usize].fetch_or(bit, Ordering::SeqCst);
    }

    /// Makes the bitmaps exactly `wanted`. The caller holds every writer
    /// off (the maps' lock), and `wanted` has the bit of every address in
    /// the tables.
    pub fn replace(&self, wanted: &Bitmaps) {
        for (word, want) in self.0.words().iter().zip(&wanted.0) {
            if word.load(Ordering::Relaxed) != *want {
                word.store(*want, Ordering::SeqCst);
            }
        }
    }
}

/// The loaded programs' `GENERATIONS` (none through the pins: nothing
/// caches then).
pub struct Generations(Option<MappedWords>);

impl Generations {
    pub fn map(fd: impl AsFd) -> Result<Self, KernelError> {
        let len = generation::COUNT as usize;
        MappedWords::map(fd, len, map_names::GENERATIONS).map(|w| Self(Some(w)))
    }

    pub fn none() -> Self {
        Self(None)
    }

    /// Starts a new generation `which` (of `limiter_common::generation`),
    /// after a change that can end what the CPUs' copies say: every copy
    /// made before is stale from here. Never 0, which turns the caches off.
    pub fn next(&self, which: u32) {
        let Some(words) = &self.0 else {
            return;
        };
        let generation = &words.words()[which as usize];
        if generation.fetch_add(1, Ordering::SeqCst) == u64::MAX {
            generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}
