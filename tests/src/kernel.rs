//! Loads the real kernel programs with a private pin path, removed on drop.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    sync::Arc,
};

use limiter_user::kernel::{BpfDatapath, KernelLimits, KernelOptions, MapSizes};

/// Where the kernel object is expected: `LIMITER_EBPF_OBJECT` (set by
/// `cargo xtask test`) or the workspace's release build.
pub fn object_path() -> PathBuf {
    std::env::var_os("LIMITER_EBPF_OBJECT").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/limiter-ebpf")
        },
        PathBuf::from,
    )
}

/// The kernel object, if built.
pub fn ebpf_object() -> Option<PathBuf> {
    let path = object_path();
    path.is_file().then_some(path)
}

/// The benchmark's reference programs (`baseline_pass`, `baseline_drop`),
/// built next to the main object.
pub fn baseline_object() -> PathBuf {
    object_path().with_file_name("limiter-baseline")
}

/// A reference program of the baseline object (e.g. `baseline_pass`, the
/// empty XDP program), loaded and ready for `BPF_PROG_TEST_RUN`: what the
/// benchmarks measure the limiter against in the same rounds.
pub struct Baseline {
    ebpf: aya::Ebpf,
    name: &'static str,
}

impl Baseline {
    /// Loads the XDP program `name` from [`baseline_object`].
    ///
    /// # Errors
    /// The object is missing, has no such program, or the kernel refuses it.
    pub fn load(name: &'static str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let path = baseline_object();
        let mut ebpf =
            aya::Ebpf::load_file(&path).with_context(|| format!("loading {}", path.display()))?;
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("{} has no program {name}", path.display()))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        Ok(Self { ebpf, name })
    }

    /// Runs the program `repeat` times on `packet`: (XDP action, the
    /// kernel's mean time per run).
    ///
    /// # Errors
    /// The test run failed.
    pub fn run(&self, packet: &[u8], repeat: u32) -> anyhow::Result<(u32, std::time::Duration)> {
        use anyhow::Context as _;
        use aya::programs::{TestRun as _, TestRunOptions};
        let program: &aya::programs::Xdp = self
            .ebpf
            .program(self.name)
            .context("baseline program gone")?
            .try_into()?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::new()
        })?;
        Ok((result.return_value, result.duration))
    }
}

/// Loaded programs with their own pin directory.
pub struct TestKernel {
    // Field order matters: the programs go before their pins.
    /// Shared so a test proxy can use it as its kernel layer.
    pub datapath: Arc<BpfDatapath>,
    pins: PinDir,
}

/// A pin directory no other test uses, removed (with its pins) on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/smtp-limiter-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("removing test pins {}: {e}", self.0.display());
            }
        }
    }
}

impl TestKernel {
    /// Loads the programs with `limits` and default map sizes.
    ///
    /// # Panics
    /// If loading fails: the tests exist to show that it does not.
    pub fn load(limits: KernelLimits) -> Self {
        Self::load_with(limits, MapSizes::default())
    }

    /// As [`Self::load`], with explicit map sizes.
    ///
    /// # Panics
    /// If loading fails.
    pub fn load_with(limits: KernelLimits, map_sizes: MapSizes) -> Self {
        let pins = PinDir::new();
        let options = KernelOptions {
            object: ebpf_object(),
            pin_path: pins.path().to_owned(),
            map_sizes,
            limits,
        };
        let datapath = BpfDatapath::load(&options)
            .unwrap_or_else(|e| panic!("loading the kernel programs: {e}"));
        Self {
            datapath: Arc::new(datapath),
            pins,
        }
    }

    pub fn pin_path(&self) -> &std::path::Path {
        self.pins.path()
    }
}
