//! [`BpfDatapath`]: the kernel programs loaded with aya, their maps pinned
//! under one directory and reused across restarts.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, MapInfo, MapType, PerCpuArray,
        RingBuf,
    },
    programs::{
        tc::{self, TcAttachType},
        CgroupAttachMode, ProgramError, SchedClassifier, SockOps, TestRun, TestRunOptions, Xdp,
        XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader, VerifierLogLevel,
};
use ipnet::IpNet;
use limiter_common::{
    generation, hint, host_hint, hot, map_names as names, program_names, words_to_octets, Allow,
    Block, Cap, Config, ConnCount, DropReason, HotBlockV4, HotBlockV6, Ipv4Octets, Ipv6Octets,
    Mode, Reason, Stats, TrackedSocket, MAX_PORTS,
};
use tokio::io::{unix::AsyncFd, Interest};

pub use crate::config::{Attach as AttachMode, MapSizes};

use super::{
    addr::{
        canonical, host_ip, host_key, ip_of_mapped, is_host, net_key, net_of_v4, net_of_v6,
        HostKey, NetKey,
    },
    clock::{mono_ns_to_system, system_to_mono_ns},
    hints::{self, Layer},
    mapped::{Bitmaps, BlockHints, Generations},
    BlockHit, Datapath, DropEvent, KernelBlock, KernelCounters, KernelError, KernelLimits,
};

/// The kernel object built into this binary, if it was built with one.
#[cfg(limiter_ebpf_embedded)]
static EMBEDDED_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/limiter-ebpf.o"
)));
#[cfg(not(limiter_ebpf_embedded))]
static EMBEDDED_OBJECT: Option<&[u8]> = None;

/// Whether this binary carries the kernel object.
pub fn has_embedded_object() -> bool {
    EMBEDDED_OBJECT.is_some()
}

/// bpffs `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// An interface the programs were attached to, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    /// The mode that worked: "xdp", "xdp-generic" or "tc".
    pub mode: &'static str,
}

/// What [`BpfDatapath::load`] needs.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// The kernel object; `None` uses the one built into this binary.
    pub object: Option<PathBuf>,
    /// Directory (on bpffs) where the maps are pinned and found again.
    pub pin_path: PathBuf,
    pub map_sizes: MapSizes,
    pub limits: KernelLimits,
}

/// The maps, typed; one of each per address family.
struct Maps {
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, Stats>,
    allow_v4: LpmTrie<MapData, Ipv4Octets, Allow>,
    allow_v6: LpmTrie<MapData, Ipv6Octets, Allow>,
    block_v4: HashMap<MapData, Ipv4Octets, Block>,
    block_v6: HashMap<MapData, Ipv6Octets, Block>,
    block_net_v4: LpmTrie<MapData, Ipv4Octets, Block>,
    block_net_v6: LpmTrie<MapData, Ipv6Octets, Block>,
    cap_net_v4: LpmTrie<MapData, Ipv4Octets, Cap>,
    cap_net_v6: LpmTrie<MapData, Ipv6Octets, Cap>,
    conn_count_v4: HashMap<MapData, Ipv4Octets, ConnCount>,
    conn_count_v6: HashMap<MapData, Ipv6Octets, ConnCount>,
    events: Option<RingBuf<MapData>>,
    /// Prefilters of the six tries: each /16's bit…
    hints: Array<MapData, u64>,
    /// …and the short and fine bitmaps behind them.
    fine_hints: Array<MapData, u64>,
    /// The tries' networks behind each prefilter bit (by `hint` index).
    coverage: [hints::Coverage; hint::COUNT as usize],
    /// Prefilter of the host tables, mapped into memory.
    block_hints: BlockHints,
    /// Generations of what the CPUs' caches copy (the loaded program's).
    generations: Generations,
    /// While a rebuild of `block_hints` scans the host tables: the bits of
    /// the addresses blocked since the scan began, which it must keep.
    block_hint_log: Option<Vec<(u32, u64)>>,
    /// The CPUs' copies of hot host blocks (the loaded program's; none
    /// through the pins).
    hot_v4: Option<PerCpuArray<MapData, HotBlockV4>>,
    hot_v6: Option<PerCpuArray<MapData, HotBlockV6>>,
    hot_nets_v4: Option<PerCpuArray<MapData, HotBlockV4>>,
    hot_nets_v6: Option<PerCpuArray<MapData, HotBlockV6>>,
    /// The serial of the next new block entry ([`Block::serial`]).
    next_serial: u32,
    sizes: MapSizes,
}

impl Drop for BpfDatapath {
    /// The programs detach (the maps stay pinned); the drops their CPUs
    /// counted in cached copies go to the entries.
    fn drop(&mut self) {
        self.detach();
    }
}

/// `bpf_map_update_elem` flag: only replace an existing entry.
const BPF_EXIST: u64 = 2;

/// Drops counted in the CPUs' copies of block entries and not yet in the
/// entries: of host entries by address and serial, of network entries (a
/// copy per source inside) by serial.
struct CachedDrops {
    v4: std::collections::HashMap<(Ipv4Octets, u32), u64>,
    v6: std::collections::HashMap<(Ipv6Octets, u32), u64>,
    nets: std::collections::HashMap<u32, u64>,
}

impl CachedDrops {
    /// `block` with the drops counted in copies of it added.
    fn add_to(drops: Option<&u64>, block: &Block) -> Block {
        Block {
            drops: block.drops + drops.copied().unwrap_or(0),
            ..*block
        }
    }
}

/// The loaded kernel programs and their maps.
pub struct BpfDatapath {
    maps: Mutex<Maps>,
    /// Programs and links: they detach when this is dropped.
    ebpf: Mutex<Option<Ebpf>>,
    attachments: Mutex<Vec<Attachment>>,
    pin_path: PathBuf,
    /// `flock` on the pin directory: one agent per pin path.
    _lock: Option<File>,
}

impl BpfDatapath {
    /// Loads the programs, creates or reuses the pinned maps, attaches the
    /// connection accounting to the cgroup v2 root and applies `limits`.
    /// Connections are counted in the calling thread's network namespace.
    ///
    /// # Errors
    /// Not root, no BPF, a verifier rejection (with the verifier's log), a
    /// pin path not on bpffs or held by another agent, stale pinned maps.
    pub fn load(options: &KernelOptions) -> Result<Self, KernelError> {
        let owned;
        let object: &[u8] = match &options.object {
            Some(path) => {
                owned = std::fs::read(path).map_err(|source| KernelError::ReadObject {
                    path: path.clone(),
                    source,
                })?;
                &owned
            }
            None => EMBEDDED_OBJECT.ok_or(KernelError::NoObject)?,
        };
        let pin_path = &options.pin_path;
        prepare_pin_dir(pin_path)?;
        let lock = lock_pin_dir(pin_path)?;
        check_pinned_maps(pin_path)?;

        let pins: Vec<(&str, PathBuf)> =
            names::ALL.iter().map(|n| (*n, pin_path.join(n))).collect();
        let sizes = options.map_sizes;
        let mut loader = EbpfLoader::new();
        // The verifier's log is collected only when a program is refused;
        // LIMITER_VERIFIER_LOG=1 asks for the verbose one.
        loader.verifier_log_level(if std::env::var_os("LIMITER_VERIFIER_LOG").is_some() {
            VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS
        } else {
            VerifierLogLevel::DEBUG | VerifierLogLevel::STATS
        });
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        // Each size holds for both families' maps.
        for (v4, v6, size) in sized_maps(sizes) {
            loader.map_max_entries(v4, size).map_max_entries(v6, size);
        }
        loader.map_max_entries(names::CONN_SOCKS, sizes.conn_socks);
        let mut ebpf = loader
            .load(object)
            .map_err(|e| KernelError::Load(with_permission_hint(error_chain(&e))))?;

        load_program::<Xdp>(&mut ebpf, program_names::XDP)?;
        load_program::<SchedClassifier>(&mut ebpf, program_names::TC)?;
        load_program::<SockOps>(&mut ebpf, program_names::SOCK_OPS)?;
        let cgroup = cgroup2_root()?;
        let cgroup_dir = File::open(&cgroup).map_err(|source| KernelError::Io {
            context: format!("opening cgroup {}", cgroup.display()),
            source,
        })?;
        // A bpf_link attachment (what aya uses on ≥ 5.7) always coexists with
        // other programs on the cgroup; the kernel refuses explicit flags.
        program_mut::<SockOps>(&mut ebpf, program_names::SOCK_OPS)?
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| program_error(program_names::SOCK_OPS, e))?;

        let mut maps = Maps::take(&mut ebpf, sizes)?;
        maps.warn_on_size_mismatch(pin_path);
        // Pins from an earlier run: make the prefilters match their tries.
        for map in 0..hint::COUNT {
            maps.rebuild_hints(map)?;
        }
        let datapath = Self {
            maps: Mutex::new(maps),
            ebpf: Mutex::new(Some(ebpf)),
            attachments: Mutex::new(Vec::new()),
            pin_path: pin_path.clone(),
            _lock: Some(lock),
        };
        datapath.rebuild_block_hints()?;
        datapath.write_config(&options.limits, current_netns_cookie()?)?;
        Ok(datapath)
    }

    /// Both host tables, read without the lock; the addresses blocked
    /// meanwhile are logged for [`Maps::rebuild_block_hints`], which must
    /// follow (the log is dropped if the scan fails).
    #[expect(clippy::type_complexity, reason = "the two tables' entries, as read")]
    fn scan_hosts(
        &self,
    ) -> Result<(Vec<(Ipv4Octets, Block)>, Vec<(Ipv6Octets, Block)>), KernelError> {
        lock(&self.maps).block_hint_log = Some(Vec::new());
        let scanned = hash_entries_unlocked(&self.maps, |m| &m.block_v4)
            .map_err(|e| map_error(names::BLOCK_V4, e))
            .and_then(|v4| {
                let v6 = hash_entries_unlocked(&self.maps, |m| &m.block_v6)
                    .map_err(|e| map_error(names::BLOCK_V6, e))?;
                Ok((v4, v6))
            });
        if scanned.is_err() {
            lock(&self.maps).block_hint_log = None;
        }
        scanned
    }

    /// Makes `BLOCK_HINTS` match the host tables (pins of an earlier run,
    /// or of a version without the prefilter).
    fn rebuild_block_hints(&self) -> Result<(), KernelError> {
        let (v4, v6) = self.scan_hosts()?;
        let mut maps = lock(&self.maps);
        maps.rebuild_block_hints(&v4, &v6, |_| true);
        // Serials go on from the pinned entries' (an earlier run's).
        fn newest<K: aya::Pod>(trie: &LpmTrie<MapData, K, Block>) -> u32 {
            trie.iter()
                .filter_map(Result::ok)
                .map(|(_, b)| b.serial)
                .max()
                .unwrap_or(0)
        }
        let hosts = v4
            .iter()
            .map(|(_, b)| b.serial)
            .chain(v6.iter().map(|(_, b)| b.serial));
        let newest = hosts
            .chain([newest(&maps.block_net_v4), newest(&maps.block_net_v6)])
            .max()
            .unwrap_or(0);
        maps.next_serial = newest.wrapping_add(1).max(1);
        // Also leaves generation 0, which keeps the CPUs' caches off.
        maps.generations.next(generation::BLOCKS);
        maps.generations.next(generation::CONNECTIONS);
        Ok(())
    }

    /// The maps pinned by a running (or stopped) agent, without loading any
    /// program: for the CLI and for inspection.
    ///
    /// # Errors
    /// The pins are missing, unreadable or from another version.
    pub fn open_pinned(pin_path: &Path) -> Result<Self, KernelError> {
        check_pinned_maps(pin_path)?;
        let maps = Maps::from_pins(pin_path)?;
        Ok(Self {
            maps: Mutex::new(maps),
            ebpf: Mutex::new(None),
            attachments: Mutex::new(Vec::new()),
            pin_path: pin_path.to_owned(),
            _lock: None,
        })
    }

    /// Attaches the packet program to `interface` (looked up in the calling
    /// thread's network namespace, whose connections are then the ones
    /// counted).
    ///
    /// # Errors
    /// Unknown interface, or no mode of `mode` could attach (each mode's
    /// error is in the message).
    pub fn attach(&self, interface: &str, mode: AttachMode) -> Result<Attachment, KernelError> {
        let mut guard = lock(&self.ebpf);
        let ebpf = guard.as_mut().ok_or_else(|| {
            KernelError::Invalid("the programs are not loaded (opened from pins only)".into())
        })?;
        let tries: &[&'static str] = match mode {
            AttachMode::Auto => &["xdp", "xdp-generic", "tc"],
            AttachMode::Xdp => &["xdp"],
            AttachMode::XdpGeneric => &["xdp-generic"],
            AttachMode::Tc => &["tc"],
        };
        let mut failures = Vec::new();
        for &how in tries {
            let result = match how {
                "xdp" | "xdp-generic" => {
                    let xdp_mode = if how == "xdp" {
                        XdpMode::Driver
                    } else {
                        XdpMode::Skb
                    };
                    program_mut::<Xdp>(ebpf, program_names::XDP).and_then(|p| {
                        p.attach(interface, xdp_mode)
                            .map(drop)
                            .map_err(|e| program_error(program_names::XDP, e))
                    })
                }
                _ => attach_tc(ebpf, interface),
            };
            match result {
                Ok(()) => {
                    let attachment = Attachment {
                        interface: interface.to_owned(),
                        mode: how,
                    };
                    lock(&self.attachments).push(attachment.clone());
                    drop(guard);
                    self.set_netns_cookie(current_netns_cookie()?)?;
                    return Ok(attachment);
                }
                Err(e) => failures.push(format!("{how}: {e}")),
            }
        }
        Err(KernelError::Attach {
            interface: interface.to_owned(),
            mode: mode.name(),
            message: failures.join("; "),
        })
    }

    /// Where the programs are attached.
    pub fn attachments(&self) -> Vec<Attachment> {
        lock(&self.attachments).clone()
    }

    /// The pin directory.
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// Detaches every program (maps stay pinned). Also happens on drop.
    pub fn detach(&self) {
        let programs = lock(&self.ebpf).take();
        lock(&self.attachments).clear();
        if programs.is_some() {
            drop(programs);
            // Once: the copies are not zeroed, and nothing counts any more.
            self.flush_hot_drops();
        }
    }

    /// Adds the drops counted in the CPUs' copies of block entries to the
    /// entries (the pinned maps outlive the copies). With the programs
    /// detached, nothing counts meanwhile.
    fn flush_hot_drops(&self) {
        fn add<K: aya::Pod>(
            table: &mut HashMap<MapData, K, Block>,
            cached: std::collections::HashMap<(K, u32), u64>,
        ) {
            for ((key, serial), drops) in cached {
                let entry = table.get(&key, 0).ok().filter(|b| b.serial == serial);
                if let Some(block) = entry {
                    let block = CachedDrops::add_to(Some(&drops), &block);
                    let _ = table.insert(key, block, BPF_EXIST);
                }
            }
        }
        fn add_nets<K: aya::Pod>(
            trie: &mut LpmTrie<MapData, K, Block>,
            cached: &std::collections::HashMap<u32, u64>,
        ) {
            let entries: Vec<(Key<K>, Block)> = trie.iter().filter_map(Result::ok).collect();
            for (key, block) in entries {
                if let Some(drops) = cached.get(&block.serial).filter(|_| block.serial != 0) {
                    let block = CachedDrops::add_to(Some(drops), &block);
                    let _ = trie.insert(&key, block, BPF_EXIST);
                }
            }
        }
        let mut maps = lock(&self.maps);
        let cached = maps.cached_drops();
        add(&mut maps.block_v4, cached.v4);
        add(&mut maps.block_v6, cached.v6);
        add_nets(&mut maps.block_net_v4, &cached.nets);
        add_nets(&mut maps.block_net_v6, &cached.nets);
    }

    /// The drop-event stream; there is one, the first caller gets it. Must
    /// be called inside a tokio runtime.
    ///
    /// # Errors
    /// Already taken, or the ring buffer cannot be polled.
    pub fn take_events(&self) -> Result<DropEvents, KernelError> {
        let ring = lock(&self.maps).events.take().ok_or_else(|| {
            KernelError::Invalid("the drop-event stream was already taken".into())
        })?;
        // SAFETY: the ring buffer owns its descriptor and keeps it open and
        // unchanged for as long as the AsyncFd holds it.
        let fd =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                KernelError::Io {
                    context: "polling the EVENTS ring buffer".into(),
                    source: io::Error::other(e.to_string()),
                }
            })?;
        Ok(DropEvents { fd })
    }

    /// Runs the XDP program once per `repeat` on `packet` in the kernel
    /// (`BPF_PROG_TEST_RUN`); returns the action and the kernel's mean time
    /// per run. For tests and benchmarks.
    ///
    /// # Errors
    /// The programs are not loaded, or the kernel refused the run.
    pub fn test_run_xdp(&self, packet: &[u8], repeat: u32) -> Result<(u32, Duration), KernelError> {
        self.test_run::<Xdp>(program_names::XDP, packet, repeat)
    }

    /// As [`Self::test_run_xdp`], for the TC program (returns the TC action).
    ///
    /// # Errors
    /// As [`Self::test_run_xdp`].
    pub fn test_run_tc(&self, packet: &[u8], repeat: u32) -> Result<(u32, Duration), KernelError> {
        self.test_run::<SchedClassifier>(program_names::TC, packet, repeat)
    }

    fn test_run<P>(
        &self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), KernelError>
    where
        P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
        for<'p> &'p mut P: TryFrom<&'p mut aya::programs::Program, Error = ProgramError>,
    {
        let mut guard = lock(&self.ebpf);
        let ebpf = guard
            .as_mut()
            .ok_or_else(|| KernelError::Invalid("the programs are not loaded".into()))?;
        let program = program_mut::<P>(ebpf, name)?;
        let options = TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::new()
        };
        let result = program
            .test_run(options)
            .map_err(|e| program_error(name, e))?;
        Ok((result.return_value, result.duration))
    }

    /// Sets the kernel's connection count of `source` (its prefix for IPv6)
    /// as the `sock_ops` program would after `count` handshakes: for tests
    /// and benchmarks, which need a source at or near its cap without
    /// opening that many connections.
    ///
    /// # Errors
    /// The map refused the entry (full).
    pub fn set_connection_count(&self, source: IpAddr, count: u32) -> Result<(), KernelError> {
        let mut maps = lock(&self.maps);
        let max = maps.sizes.conn_count;
        let value = ConnCount { connections: count };
        let written = match maps.count_key(source)? {
            HostKey::V4(key) => maps
                .conn_count_v4
                .insert(key, value, 0)
                .map_err(|e| insert_error(names::CONN_COUNT_V4, max, "conn_count", e)),
            HostKey::V6(key) => maps
                .conn_count_v6
                .insert(key, value, 0)
                .map_err(|e| insert_error(names::CONN_COUNT_V6, max, "conn_count", e)),
        };
        maps.generations.next(generation::CONNECTIONS);
        written
    }

    fn write_config(&self, limits: &KernelLimits, netns_cookie: u64) -> Result<(), KernelError> {
        let config = config_of(limits, netns_cookie)?;
        let mut maps = lock(&self.maps);
        let written = maps
            .config
            .set(0, config, 0)
            .map_err(|e| map_error(names::CONFIG, e));
        // The cap, the IPv6 prefix or the mode may have changed.
        maps.generations.next(generation::CONNECTIONS);
        written
    }

    /// What `describe` adds for the mode in `CONFIG`: nothing when the
    /// programs enforce.
    fn mode_note(&self) -> &'static str {
        match lock(&self.maps).config.get(&0, 0) {
            Ok(config) if config.observes() => {
                "; observe mode: drops nothing, counts would_drop_* instead"
            }
            _ => "",
        }
    }

    fn set_netns_cookie(&self, netns_cookie: u64) -> Result<(), KernelError> {
        let mut maps = lock(&self.maps);
        let mut config = maps
            .config
            .get(&0, 0)
            .map_err(|e| map_error(names::CONFIG, e))?;
        config.netns_cookie = netns_cookie;
        maps.config
            .set(0, config, 0)
            .map_err(|e| map_error(names::CONFIG, e))
    }
}

impl Datapath for BpfDatapath {
    fn describe(&self) -> String {
        let mode = self.mode_note();
        let attachments = self.attachments();
        let loaded = lock(&self.ebpf).is_some();
        if !loaded {
            return format!(
                "kernel maps at {} (programs not loaded by this process){mode}",
                self.pin_path.display()
            );
        }
        if attachments.is_empty() {
            format!(
                "kernel layer loaded, maps pinned at {}, connection accounting on, packet program attached nowhere (kernel.interfaces is empty){mode}",
                self.pin_path.display()
            )
        } else {
            let list: Vec<String> = attachments
                .iter()
                .map(|a| format!("{} ({})", a.interface, a.mode))
                .collect();
            format!(
                "kernel layer loaded, maps pinned at {}, attached to {}{mode}",
                self.pin_path.display(),
                list.join(", ")
            )
        }
    }

    fn block(
        &self,
        net: IpNet,
        expires: Option<SystemTime>,
        origin: Reason,
    ) -> Result<(), KernelError> {
        let net = canonical(net);
        let value = Block {
            expires_mono_ns: expires.map_or(0, system_to_mono_ns),
            drops: 0,
            reason: origin as u32,
            serial: 0,
        };
        let mut maps = lock(&self.maps);
        let max = maps.sizes.block;
        // An entry that is being extended keeps its drop count.
        if is_host(net) {
            match host_key(net.addr()) {
                HostKey::V4(key) => {
                    maps.add_block_hint(host_hint::of_v4(key));
                    let old = maps.block_v4.get(&key, 0).ok();
                    let entry = maps.entry_over(old, value);
                    maps.block_v4
                        .insert(key, entry, 0)
                        .map_err(|e| insert_error(names::BLOCK_V4, max, "block", e))?;
                    maps.extended(old, &value);
                    Ok(())
                }
                HostKey::V6(key) => {
                    maps.add_block_hint(host_hint::of_v6(key));
                    let old = maps.block_v6.get(&key, 0).ok();
                    let entry = maps.entry_over(old, value);
                    maps.block_v6
                        .insert(key, entry, 0)
                        .map_err(|e| insert_error(names::BLOCK_V6, max, "block", e))?;
                    maps.extended(old, &value);
                    Ok(())
                }
            }
        } else {
            let max = maps.sizes.block_net;
            maps.add_hint(Trie::BlockNet, net)?;
            match net_key(net) {
                NetKey::V4(key) => {
                    let old = maps.block_net_v4.get(&key, 0).ok();
                    let entry = maps.entry_over(old, value);
                    maps.block_net_v4
                        .insert(&key, entry, 0)
                        .map_err(|e| insert_error(names::BLOCK_NET_V4, max, "block_net", e))?;
                }
                NetKey::V6(key) => {
                    let old = maps.block_net_v6.get(&key, 0).ok();
                    let entry = maps.entry_over(old, value);
                    maps.block_net_v6
                        .insert(&key, entry, 0)
                        .map_err(|e| insert_error(names::BLOCK_NET_V6, max, "block_net", e))?;
                }
            }
            // A copy holds the most specific entry it found: a new one
            // inside it, or a new expiry, must end it.
            maps.generations.next(generation::BLOCKS);
            Ok(())
        }
    }

    fn unblock(&self, net: IpNet) -> Result<bool, KernelError> {
        let net = canonical(net);
        let mut maps = lock(&self.maps);
        let removed = if is_host(net) {
            match host_key(net.addr()) {
                HostKey::V4(key) => absent_is_false(maps.block_v4.remove(&key), names::BLOCK_V4),
                HostKey::V6(key) => absent_is_false(maps.block_v6.remove(&key), names::BLOCK_V6),
            }
        } else {
            match net_key(net) {
                NetKey::V4(key) => {
                    absent_is_false(maps.block_net_v4.remove(&key), names::BLOCK_NET_V4)
                }
                NetKey::V6(key) => {
                    absent_is_false(maps.block_net_v6.remove(&key), names::BLOCK_NET_V6)
                }
            }
        };
        // After the removal: the CPUs' copies of it are stale.
        maps.generations.next(generation::BLOCKS);
        if !is_host(net) {
            maps.remove_hint(Trie::BlockNet, net)?;
        }
        removed
    }

    fn blocks(&self) -> Result<Vec<KernelBlock>, KernelError> {
        // The host maps (up to a million entries, half a second) are read
        // without the lock that every new connection's lookup needs.
        let cached = lock(&self.maps).cached_drops();
        let with_hot = |block: &Block, drops| CachedDrops::add_to(drops, block);
        let (hot_v4, hot_v6) = (
            |key: &Ipv4Octets, b: &Block| cached.v4.get(&(*key, b.serial)),
            |key: &Ipv6Octets, b: &Block| cached.v6.get(&(*key, b.serial)),
        );
        let hot_net = |b: &Block| cached.nets.get(&b.serial).filter(|_| b.serial != 0);
        let mut blocks: Vec<KernelBlock> = hash_entries_unlocked(&self.maps, |m| &m.block_v4)
            .map_err(|e| map_error(names::BLOCK_V4, e))?
            .iter()
            .map(|(key, block)| {
                kernel_block(
                    host_net(HostKey::V4(*key)),
                    &with_hot(block, hot_v4(key, block)),
                )
            })
            .collect();
        blocks.extend(
            hash_entries_unlocked(&self.maps, |m| &m.block_v6)
                .map_err(|e| map_error(names::BLOCK_V6, e))?
                .iter()
                .map(|(key, block)| {
                    kernel_block(
                        host_net(HostKey::V6(*key)),
                        &with_hot(block, hot_v6(key, block)),
                    )
                }),
        );
        let maps = lock(&self.maps);
        for entry in maps.block_net_v4.iter() {
            let (key, block) = entry.map_err(|e| map_error(names::BLOCK_NET_V4, e))?;
            blocks.push(kernel_block(
                net_of_v4(&key),
                &with_hot(&block, hot_net(&block)),
            ));
        }
        for entry in maps.block_net_v6.iter() {
            let (key, block) = entry.map_err(|e| map_error(names::BLOCK_NET_V6, e))?;
            blocks.push(kernel_block(
                net_of_v6(&key),
                &with_hot(&block, hot_net(&block)),
            ));
        }
        Ok(blocks)
    }

    fn block_covering(&self, addr: IpAddr) -> Result<Option<BlockHit>, KernelError> {
        let now = system_to_mono_ns(SystemTime::now());
        let maps = lock(&self.maps);
        // A syscall lookup in an LPM trie is a longest-prefix match too.
        let (exact, net) = match host_key(addr) {
            HostKey::V4(key) => (
                absent_is_none(maps.block_v4.get(&key, 0), names::BLOCK_V4)?,
                absent_is_none(
                    maps.block_net_v4.get(&Key::new(32, key), 0),
                    names::BLOCK_NET_V4,
                )?,
            ),
            HostKey::V6(key) => (
                absent_is_none(maps.block_v6.get(&key, 0), names::BLOCK_V6)?,
                absent_is_none(
                    maps.block_net_v6.get(&Key::new(128, key), 0),
                    names::BLOCK_NET_V6,
                )?,
            ),
        };
        let found = exact
            .filter(|b| b.active_at(now))
            .or(net.filter(|b| b.active_at(now)));
        Ok(found.map(|b| BlockHit {
            origin: Reason::from_code(b.reason),
            expires: (b.expires_mono_ns != 0).then(|| mono_ns_to_system(b.expires_mono_ns)),
        }))
    }

    fn sweep_expired(&self, now: SystemTime) -> Result<usize, KernelError> {
        let now = system_to_mono_ns(now);
        let expired = |b: &Block| !b.active_at(now);
        let mut swept = 0;
        // The host maps are scanned without the lock (see `blocks`); a
        // block re-added since the scan has a new expiry: each removal
        // checks again.
        let (entries_v4, entries_v6) = self.scan_hosts()?;
        let hosts_v4: Vec<Ipv4Octets> = entries_v4
            .iter()
            .filter_map(|(key, b)| expired(b).then_some(*key))
            .collect();
        let hosts_v6: Vec<Ipv6Octets> = entries_v6
            .iter()
            .filter_map(|(key, b)| expired(b).then_some(*key))
            .collect();
        let mut maps = lock(&self.maps);
        for key in &hosts_v4 {
            if maps.block_v4.get(key, 0).is_ok_and(|b| expired(&b))
                && maps.block_v4.remove(key).is_ok()
            {
                swept += 1;
            }
        }
        for key in &hosts_v6 {
            if maps.block_v6.get(key, 0).is_ok_and(|b| expired(&b))
                && maps.block_v6.remove(key).is_ok()
            {
                swept += 1;
            }
        }
        let nets_v4: Vec<Key<Ipv4Octets>> = maps
            .block_net_v4
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, b)| expired(&b).then_some(key))
            .collect();
        for key in &nets_v4 {
            if maps.block_net_v4.get(key, 0).is_ok_and(|b| expired(&b))
                && maps.block_net_v4.remove(key).is_ok()
            {
                swept += 1;
            }
        }
        let nets_v6: Vec<Key<Ipv6Octets>> = maps
            .block_net_v6
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, b)| expired(&b).then_some(key))
            .collect();
        for key in &nets_v6 {
            if maps.block_net_v6.get(key, 0).is_ok_and(|b| expired(&b))
                && maps.block_net_v6.remove(key).is_ok()
            {
                swept += 1;
            }
        }
        // Also heals a bit lost to two writers (agent and CLI) racing.
        maps.rebuild_hints(hint::BLOCK_NET_V4)?;
        maps.rebuild_hints(hint::BLOCK_NET_V6)?;
        // The removed addresses' bits go; a bit another address shares stays.
        maps.rebuild_block_hints(&entries_v4, &entries_v6, |b| !expired(b));
        if swept > 0 {
            maps.generations.next(generation::BLOCKS);
        }
        Ok(swept)
    }

    fn allow(&self, net: IpNet) -> Result<(), KernelError> {
        let mut maps = lock(&self.maps);
        let max = maps.sizes.allow;
        maps.add_hint(Trie::Allow, net)?;
        let value = Allow { flags: 0 };
        match net_key(net) {
            NetKey::V4(key) => maps.allow_v4.insert(&key, value, 0),
            NetKey::V6(key) => maps.allow_v6.insert(&key, value, 0),
        }
        .map_err(|e| insert_error(Trie::Allow.map(net), max, "allow", e))
    }

    fn disallow(&self, net: IpNet) -> Result<bool, KernelError> {
        let mut maps = lock(&self.maps);
        let removed = match net_key(net) {
            NetKey::V4(key) => maps.allow_v4.remove(&key),
            NetKey::V6(key) => maps.allow_v6.remove(&key),
        };
        maps.remove_hint(Trie::Allow, net)?;
        absent_is_false(removed, Trie::Allow.map(net))
    }

    fn allows(&self) -> Result<Vec<IpNet>, KernelError> {
        let maps = lock(&self.maps);
        let mut nets = Vec::new();
        for key in maps.allow_v4.keys() {
            nets.push(net_of_v4(&key.map_err(|e| map_error(names::ALLOW_V4, e))?));
        }
        for key in maps.allow_v6.keys() {
            nets.push(net_of_v6(&key.map_err(|e| map_error(names::ALLOW_V6, e))?));
        }
        Ok(nets)
    }

    fn set_cap(&self, net: IpNet, max_connections: u32) -> Result<(), KernelError> {
        let mut maps = lock(&self.maps);
        let max = maps.sizes.cap_net;
        maps.add_hint(Trie::CapNet, net)?;
        let value = Cap { max_connections };
        let written = match net_key(net) {
            NetKey::V4(key) => maps.cap_net_v4.insert(&key, value, 0),
            NetKey::V6(key) => maps.cap_net_v6.insert(&key, value, 0),
        }
        .map_err(|e| insert_error(Trie::CapNet.map(net), max, "cap_net", e));
        maps.generations.next(generation::CONNECTIONS);
        written
    }

    fn remove_cap(&self, net: IpNet) -> Result<bool, KernelError> {
        let mut maps = lock(&self.maps);
        let removed = match net_key(net) {
            NetKey::V4(key) => maps.cap_net_v4.remove(&key),
            NetKey::V6(key) => maps.cap_net_v6.remove(&key),
        };
        maps.generations.next(generation::CONNECTIONS);
        maps.remove_hint(Trie::CapNet, net)?;
        absent_is_false(removed, Trie::CapNet.map(net))
    }

    fn caps(&self) -> Result<Vec<(IpNet, u32)>, KernelError> {
        let maps = lock(&self.maps);
        let mut caps = Vec::new();
        for entry in maps.cap_net_v4.iter() {
            let (key, cap) = entry.map_err(|e| map_error(names::CAP_NET_V4, e))?;
            caps.push((net_of_v4(&key), cap.max_connections));
        }
        for entry in maps.cap_net_v6.iter() {
            let (key, cap) = entry.map_err(|e| map_error(names::CAP_NET_V6, e))?;
            caps.push((net_of_v6(&key), cap.max_connections));
        }
        Ok(caps)
    }

    fn set_limits(&self, limits: &KernelLimits) -> Result<(), KernelError> {
        let cookie = {
            let maps = lock(&self.maps);
            maps.config
                .get(&0, 0)
                .map_err(|e| map_error(names::CONFIG, e))?
                .netns_cookie
        };
        self.write_config(limits, cookie)
    }

    fn connections(&self, addr: IpAddr) -> Result<u32, KernelError> {
        let maps = lock(&self.maps);
        match maps.count_key(addr)? {
            HostKey::V4(key) => absent_is_default(
                maps.conn_count_v4.get(&key, 0).map(|c| c.connections),
                names::CONN_COUNT_V4,
            ),
            HostKey::V6(key) => absent_is_default(
                maps.conn_count_v6.get(&key, 0).map(|c| c.connections),
                names::CONN_COUNT_V6,
            ),
        }
    }

    fn connection_counts(&self) -> Result<Vec<(IpNet, u32)>, KernelError> {
        let maps = lock(&self.maps);
        let prefix = maps.ipv6_prefix_len()?;
        let mut counts = Vec::new();
        for entry in maps.conn_count_v4.iter() {
            let (key, count) = entry.map_err(|e| map_error(names::CONN_COUNT_V4, e))?;
            counts.push((host_net(HostKey::V4(key)), count.connections));
        }
        for entry in maps.conn_count_v6.iter() {
            let (key, count) = entry.map_err(|e| map_error(names::CONN_COUNT_V6, e))?;
            let net = IpNet::new(host_ip(HostKey::V6(key)), prefix)
                .map_or_else(|_| host_net(HostKey::V6(key)), |n| n.trunc());
            counts.push((net, count.connections));
        }
        Ok(counts)
    }

    fn counters(&self) -> Result<KernelCounters, KernelError> {
        let maps = lock(&self.maps);
        let per_cpu = maps
            .stats
            .get(&0, 0)
            .map_err(|e| map_error(names::STATS, e))?;
        let mut sum = Stats::default();
        per_cpu.iter().for_each(|cpu| sum.add(cpu));
        Ok(sum)
    }
}

/// Drop events from the kernel's ring buffer.
pub struct DropEvents {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl DropEvents {
    /// Waits for events and returns those available (at least one).
    ///
    /// # Errors
    /// Polling the ring buffer failed.
    pub async fn next_batch(&mut self) -> io::Result<Vec<DropEvent>> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(event) = decode_event(&item) {
                    batch.push(event);
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

fn decode_event(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < size_of::<limiter_common::DropEvent>() {
        return None;
    }
    // SAFETY: length checked; DropEvent is plain old data, read unaligned.
    let raw: limiter_common::DropEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(DropEvent {
        at: mono_ns_to_system(raw.mono_ns),
        source: ip_of_mapped(raw.source),
        reason: DropReason::from_code(raw.reason),
        port: raw.port,
        syn: raw.syn != 0,
        observed: raw.observed != 0,
    })
}

/// Which of the LPM tries (each has an IPv4 and an IPv6 map).
#[derive(Clone, Copy)]
enum Trie {
    Allow,
    BlockNet,
    CapNet,
}

impl Trie {
    /// The `NET_HINTS` bitmap of the trie of `net`'s family.
    fn hint(self, net: IpNet) -> u32 {
        let v6 = matches!(canonical(net), IpNet::V6(_));
        match (self, v6) {
            (Trie::Allow, false) => hint::ALLOW_V4,
            (Trie::Allow, true) => hint::ALLOW_V6,
            (Trie::BlockNet, false) => hint::BLOCK_NET_V4,
            (Trie::BlockNet, true) => hint::BLOCK_NET_V6,
            (Trie::CapNet, false) => hint::CAP_NET_V4,
            (Trie::CapNet, true) => hint::CAP_NET_V6,
        }
    }

    /// The name of the map of `net`'s family.
    fn map(self, net: IpNet) -> &'static str {
        match self.hint(net) {
            hint::ALLOW_V4 => names::ALLOW_V4,
            hint::ALLOW_V6 => names::ALLOW_V6,
            hint::BLOCK_NET_V4 => names::BLOCK_NET_V4,
            hint::BLOCK_NET_V6 => names::BLOCK_NET_V6,
            hint::CAP_NET_V4 => names::CAP_NET_V4,
            _ => names::CAP_NET_V6,
        }
    }
}

/// The full-length network of one address.
fn host_net(key: HostKey) -> IpNet {
    IpNet::from(host_ip(key))
}

impl Maps {
    /// Sets the hint bits `net` needs in its trie's bitmaps. Called before
    /// the entry goes into its trie, so no packet sees the entry without
    /// them.
    fn add_hint(&mut self, trie: Trie, net: IpNet) -> Result<(), KernelError> {
        let map = trie.hint(net);
        self.coverage[map as usize].add(net);
        for layer in Layer::ALL {
            for (offset, bits) in hints::words_of(net, layer) {
                self.update_hint_word(layer, map, offset, |word| word | bits)?;
            }
        }
        Ok(())
    }

    /// Clears the hint bits that only `net` needed, after it left its trie.
    fn remove_hint(&mut self, trie: Trie, net: IpNet) -> Result<(), KernelError> {
        let map = trie.hint(net);
        for (layer, offset, mask) in self.coverage[map as usize].remove(net) {
            self.update_hint_word(layer, map, offset, |word| word & !mask)?;
        }
        Ok(())
    }

    /// The entry to write for block `value` over `old`: an extension keeps
    /// the entry's drops and serial, a new entry takes the next serial.
    fn entry_over(&mut self, old: Option<Block>, value: Block) -> Block {
        match old {
            Some(old) => Block {
                drops: old.drops,
                serial: old.serial,
                ..value
            },
            None => {
                let serial = self.next_serial;
                self.next_serial = self.next_serial.wrapping_add(1).max(1);
                Block { serial, ..value }
            }
        }
    }

    /// After a host entry was written: if it replaced `old` with another
    /// expiry, the CPUs' copies of it are stale.
    fn extended(&self, old: Option<Block>, new: &Block) {
        if old.is_some_and(|old| old.expires_mono_ns != new.expires_mono_ns) {
            self.generations.next(generation::BLOCKS);
        }
    }

    /// Drops counted in the CPUs' copies of block entries and not yet in
    /// the entries.
    fn cached_drops(&self) -> CachedDrops {
        fn read<S: aya::Pod, K: std::hash::Hash + Eq>(
            cache: Option<&PerCpuArray<MapData, S>>,
            of: impl Fn(&S) -> (K, u64),
        ) -> std::collections::HashMap<K, u64> {
            let mut drops = std::collections::HashMap::new();
            let Some(cache) = cache else {
                return drops;
            };
            for slot in 0..hot::SLOTS {
                let Ok(copies) = cache.get(&slot, 0) else {
                    continue;
                };
                for copy in copies.iter() {
                    let (key, count) = of(copy);
                    if count != 0 {
                        *drops.entry(key).or_default() += count;
                    }
                }
            }
            drops
        }
        let mut nets = read(self.hot_nets_v4.as_ref(), |c: &HotBlockV4| {
            (c.serial, c.drops)
        });
        for (serial, count) in read(self.hot_nets_v6.as_ref(), |c: &HotBlockV6| {
            (c.serial, c.drops)
        }) {
            *nets.entry(serial).or_default() += count;
        }
        // Entries of an older version all have serial 0: theirs cannot be
        // told apart (they reach the entry every 256 drops).
        nets.remove(&0);
        CachedDrops {
            v4: read(self.hot_v4.as_ref(), |c: &HotBlockV4| {
                ((c.addr.to_ne_bytes(), c.serial), c.drops)
            }),
            v6: read(self.hot_v6.as_ref(), |c: &HotBlockV6| {
                ((words_to_octets(c.addr), c.serial), c.drops)
            }),
            nets,
        }
    }

    /// Sets a host's `BLOCK_HINTS` bit, before the host goes into its table.
    fn add_block_hint(&mut self, position: (u32, u64)) {
        self.block_hints.set(position);
        if let Some(log) = &mut self.block_hint_log {
            log.push(position);
        }
    }

    /// Makes `BLOCK_HINTS` hold the bits of the scanned entries that `keep`
    /// keeps and of the hosts blocked since the scan began
    /// ([`BpfDatapath::scan_hosts`]), and no other.
    fn rebuild_block_hints(
        &mut self,
        v4: &[(Ipv4Octets, Block)],
        v6: &[(Ipv6Octets, Block)],
        keep: impl Fn(&Block) -> bool,
    ) {
        let mut wanted = Bitmaps::new();
        for (key, _) in v4.iter().filter(|(_, b)| keep(b)) {
            wanted.add(host_hint::of_v4(*key));
        }
        for (key, _) in v6.iter().filter(|(_, b)| keep(b)) {
            wanted.add(host_hint::of_v6(*key));
        }
        for position in self.block_hint_log.take().unwrap_or_default() {
            wanted.add(position);
        }
        self.block_hints.replace(&wanted);
    }

    /// Recomputes the bitmaps of trie `map` (one of `hint`'s) and their
    /// coverage from the trie: at start (pins of an earlier run) and at each
    /// sweep (which also heals a bit lost to two processes writing at once).
    fn rebuild_hints(&mut self, map: u32) -> Result<(), KernelError> {
        fn nets<K: aya::Pod, V: aya::Pod>(
            trie: &LpmTrie<MapData, K, V>,
            net_of: fn(&Key<K>) -> IpNet,
        ) -> Vec<IpNet> {
            trie.keys()
                .filter_map(Result::ok)
                .map(|k| net_of(&k))
                .collect()
        }
        let nets = match map {
            hint::ALLOW_V4 => nets(&self.allow_v4, net_of_v4),
            hint::ALLOW_V6 => nets(&self.allow_v6, net_of_v6),
            hint::BLOCK_NET_V4 => nets(&self.block_net_v4, net_of_v4),
            hint::BLOCK_NET_V6 => nets(&self.block_net_v6, net_of_v6),
            hint::CAP_NET_V4 => nets(&self.cap_net_v4, net_of_v4),
            _ => nets(&self.cap_net_v6, net_of_v6),
        };
        self.coverage[map as usize] = hints::Coverage::of(nets);
        for layer in Layer::ALL {
            let wanted = self.coverage[map as usize].bitmap(layer);
            for (offset, bits) in wanted.into_iter().enumerate() {
                self.update_hint_word(layer, map, offset as u32, |_| bits)?;
            }
        }
        Ok(())
    }

    /// Rewrites word `offset` of bitmap `layer` of trie `map` as `change`
    /// makes it, if that changes it.
    fn update_hint_word(
        &mut self,
        layer: Layer,
        map: u32,
        offset: u32,
        change: impl FnOnce(u64) -> u64,
    ) -> Result<(), KernelError> {
        let (array, name, bitmap) = match layer {
            Layer::Any => (&mut self.hints, names::NET_HINTS, map),
            Layer::Short => (
                &mut self.fine_hints,
                names::NET_HINTS_FINE,
                hint::short(map),
            ),
            Layer::Fine => (&mut self.fine_hints, names::NET_HINTS_FINE, hint::fine(map)),
        };
        let index = bitmap * hint::WORDS + offset;
        let word = array.get(&index, 0).map_err(|e| map_error(name, e))?;
        let changed = change(word);
        if changed != word {
            array
                .set(index, changed, 0)
                .map_err(|e| map_error(name, e))?;
        }
        Ok(())
    }

    /// The prefix by which the kernel counts IPv6 sources now.
    fn ipv6_prefix_len(&self) -> Result<u8, KernelError> {
        let config = self
            .config
            .get(&0, 0)
            .map_err(|e| map_error(names::CONFIG, e))?;
        Ok(config.ipv6_prefix_len.min(128) as u8)
    }

    /// The `CONN_COUNT_*` key of a source: IPv4 its address, IPv6 its
    /// prefix.
    fn count_key(&self, addr: IpAddr) -> Result<HostKey, KernelError> {
        Ok(match host_key(addr) {
            HostKey::V4(key) => HostKey::V4(key),
            HostKey::V6(key) => {
                let prefix = self.ipv6_prefix_len()?;
                let net = IpNet::new(host_ip(HostKey::V6(key)), prefix)
                    .map_err(|e| KernelError::Invalid(format!("IPv6 prefix {prefix}: {e}")))?;
                host_key(net.trunc().network())
            }
        })
    }

    fn take(ebpf: &mut Ebpf, sizes: MapSizes) -> Result<Self, KernelError> {
        fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, KernelError> {
            let map = ebpf.take_map(name).ok_or_else(|| KernelError::Map {
                map: name,
                message: "not in the eBPF object (object and agent from different versions?)"
                    .into(),
            })?;
            T::try_from(map).map_err(|e| map_error(name, e))
        }
        Ok(Self {
            config: take(ebpf, names::CONFIG)?,
            stats: take(ebpf, names::STATS)?,
            allow_v4: take(ebpf, names::ALLOW_V4)?,
            allow_v6: take(ebpf, names::ALLOW_V6)?,
            block_v4: take(ebpf, names::BLOCK_V4)?,
            block_v6: take(ebpf, names::BLOCK_V6)?,
            block_net_v4: take(ebpf, names::BLOCK_NET_V4)?,
            block_net_v6: take(ebpf, names::BLOCK_NET_V6)?,
            cap_net_v4: take(ebpf, names::CAP_NET_V4)?,
            cap_net_v6: take(ebpf, names::CAP_NET_V6)?,
            conn_count_v4: take(ebpf, names::CONN_COUNT_V4)?,
            conn_count_v6: take(ebpf, names::CONN_COUNT_V6)?,
            events: Some(take(ebpf, names::EVENTS)?),
            hints: take(ebpf, names::NET_HINTS)?,
            fine_hints: take(ebpf, names::NET_HINTS_FINE)?,
            coverage: Default::default(),
            block_hints: {
                let array: Array<MapData, u64> = take(ebpf, names::BLOCK_HINTS)?;
                BlockHints::map(aya::maps::IterableMap::map(&array).fd())?
            },
            block_hint_log: None,
            generations: {
                let array: Array<MapData, u64> = take(ebpf, names::GENERATIONS)?;
                Generations::map(aya::maps::IterableMap::map(&array).fd())?
            },
            next_serial: 1,
            hot_v4: Some(take(ebpf, names::HOT_BLOCKS_V4)?),
            hot_v6: Some(take(ebpf, names::HOT_BLOCKS_V6)?),
            hot_nets_v4: Some(take(ebpf, names::HOT_NETS_V4)?),
            hot_nets_v6: Some(take(ebpf, names::HOT_NETS_V6)?),
            sizes,
        })
    }

    fn from_pins(dir: &Path) -> Result<Self, KernelError> {
        fn open<T: TryFrom<aya::maps::Map, Error = MapError>>(
            dir: &Path,
            name: &'static str,
            wrap: fn(MapData) -> aya::maps::Map,
        ) -> Result<T, KernelError> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|e| KernelError::PinPath {
                path: path.clone(),
                reason: format!(
                    "{e} (is the agent's kernel layer loaded? `smtp-limiter run` creates the pins)"
                ),
            })?;
            T::try_from(wrap(data)).map_err(|e| map_error(name, e))
        }
        use aya::maps::Map;
        let sizes = MapSizes {
            block: max_entries(dir, names::BLOCK_V4)?,
            block_net: max_entries(dir, names::BLOCK_NET_V4)?,
            allow: max_entries(dir, names::ALLOW_V4)?,
            cap_net: max_entries(dir, names::CAP_NET_V4)?,
            conn_count: max_entries(dir, names::CONN_COUNT_V4)?,
            conn_socks: max_entries(dir, names::CONN_SOCKS)?,
        };
        Ok(Self {
            config: open(dir, names::CONFIG, Map::Array)?,
            stats: open(dir, names::STATS, Map::PerCpuArray)?,
            allow_v4: open(dir, names::ALLOW_V4, Map::LpmTrie)?,
            allow_v6: open(dir, names::ALLOW_V6, Map::LpmTrie)?,
            block_v4: open(dir, names::BLOCK_V4, Map::HashMap)?,
            block_v6: open(dir, names::BLOCK_V6, Map::HashMap)?,
            block_net_v4: open(dir, names::BLOCK_NET_V4, Map::LpmTrie)?,
            block_net_v6: open(dir, names::BLOCK_NET_V6, Map::LpmTrie)?,
            cap_net_v4: open(dir, names::CAP_NET_V4, Map::LpmTrie)?,
            cap_net_v6: open(dir, names::CAP_NET_V6, Map::LpmTrie)?,
            conn_count_v4: open(dir, names::CONN_COUNT_V4, Map::HashMap)?,
            conn_count_v6: open(dir, names::CONN_COUNT_V6, Map::HashMap)?,
            events: None,
            hints: open(dir, names::NET_HINTS, Map::Array)?,
            fine_hints: open(dir, names::NET_HINTS_FINE, Map::Array)?,
            // Empty: a removal through these pins clears no bit (a stale
            // bit costs one lookup); the agent's sweep rebuilds them.
            coverage: Default::default(),
            block_hints: {
                let array: Array<MapData, u64> = open(dir, names::BLOCK_HINTS, Map::Array)?;
                BlockHints::map(aya::maps::IterableMap::map(&array).fd())?
            },
            block_hint_log: None,
            generations: Generations::none(),
            next_serial: 1,
            hot_v4: None,
            hot_v6: None,
            hot_nets_v4: None,
            hot_nets_v6: None,
            sizes,
        })
    }

    /// Pinned maps keep the size they were created with: say so when the
    /// configuration asks for another.
    fn warn_on_size_mismatch(&mut self, dir: &Path) {
        let wanted = self.sizes;
        let mut checks: Vec<(&'static str, &'static str, u32, &mut u32)> = Vec::new();
        let MapSizes {
            block,
            block_net,
            allow,
            cap_net,
            conn_count,
            conn_socks,
        } = &mut self.sizes;
        checks.push((names::BLOCK_V4, "block", wanted.block, block));
        checks.push((
            names::BLOCK_NET_V4,
            "block_net",
            wanted.block_net,
            block_net,
        ));
        checks.push((names::ALLOW_V4, "allow", wanted.allow, allow));
        checks.push((names::CAP_NET_V4, "cap_net", wanted.cap_net, cap_net));
        checks.push((
            names::CONN_COUNT_V4,
            "conn_count",
            wanted.conn_count,
            conn_count,
        ));
        checks.push((
            names::CONN_SOCKS,
            "conn_socks",
            wanted.conn_socks,
            conn_socks,
        ));
        for (name, key, wanted, actual) in checks {
            if let Ok(size) = max_entries(dir, name) {
                *actual = size;
                if size != wanted {
                    tracing::warn!(
                        map = name,
                        pinned = size,
                        configured = wanted,
                        "kernel.map_sizes.{key} differs from the pinned map's size; the pinned size stays until the pins are removed"
                    );
                }
            }
        }
    }
}

/// The maps sized by `kernel.map_sizes`, IPv4 and IPv6, with their size.
fn sized_maps(sizes: MapSizes) -> [(&'static str, &'static str, u32); 5] {
    [
        (names::BLOCK_V4, names::BLOCK_V6, sizes.block),
        (names::BLOCK_NET_V4, names::BLOCK_NET_V6, sizes.block_net),
        (names::ALLOW_V4, names::ALLOW_V6, sizes.allow),
        (names::CAP_NET_V4, names::CAP_NET_V6, sizes.cap_net),
        (names::CONN_COUNT_V4, names::CONN_COUNT_V6, sizes.conn_count),
    ]
}

fn max_entries(dir: &Path, name: &'static str) -> Result<u32, KernelError> {
    let path = dir.join(name);
    MapInfo::from_pin(&path)
        .map(|info| info.max_entries())
        .map_err(|e| KernelError::PinPath {
            path,
            reason: e.to_string(),
        })
}

/// The shape a pinned map must have.
struct Shape {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    /// For maps whose size is fixed by this version.
    max_entries: Option<u32>,
}

/// The shape of every pinned map.
fn expected_maps() -> [Shape; 18] {
    let shape = |name, map_type, key_size, value_size| Shape {
        name,
        map_type,
        key_size,
        value_size,
        max_entries: None,
    };
    let (v4, v6) = (size_of::<Ipv4Octets>(), size_of::<Ipv6Octets>());
    let (lpm_v4, lpm_v6) = (size_of::<Key<Ipv4Octets>>(), size_of::<Key<Ipv6Octets>>());
    let (allow, block, cap, count) = (
        size_of::<Allow>(),
        size_of::<Block>(),
        size_of::<Cap>(),
        size_of::<ConnCount>(),
    );
    [
        shape(names::CONFIG, MapType::Array, 4, size_of::<Config>()),
        shape(names::STATS, MapType::PerCpuArray, 4, size_of::<Stats>()),
        shape(names::ALLOW_V4, MapType::LpmTrie, lpm_v4, allow),
        shape(names::ALLOW_V6, MapType::LpmTrie, lpm_v6, allow),
        shape(names::BLOCK_V4, MapType::Hash, v4, block),
        shape(names::BLOCK_V6, MapType::Hash, v6, block),
        shape(names::BLOCK_NET_V4, MapType::LpmTrie, lpm_v4, block),
        shape(names::BLOCK_NET_V6, MapType::LpmTrie, lpm_v6, block),
        shape(names::CAP_NET_V4, MapType::LpmTrie, lpm_v4, cap),
        shape(names::CAP_NET_V6, MapType::LpmTrie, lpm_v6, cap),
        shape(names::CONN_COUNT_V4, MapType::Hash, v4, count),
        shape(names::CONN_COUNT_V6, MapType::Hash, v6, count),
        shape(
            names::CONN_SOCKS,
            MapType::Hash,
            8,
            size_of::<TrackedSocket>(),
        ),
        shape(names::EVENTS, MapType::RingBuf, 0, 0),
        shape(
            names::EVENT_BUDGET,
            MapType::PerCpuArray,
            4,
            size_of::<limiter_common::EventBudget>(),
        ),
        Shape {
            max_entries: Some(hint::COUNT * hint::WORDS),
            ..shape(names::NET_HINTS, MapType::Array, 4, 8)
        },
        Shape {
            max_entries: Some(hint::FINE_COUNT * hint::WORDS),
            ..shape(names::NET_HINTS_FINE, MapType::Array, 4, 8)
        },
        Shape {
            max_entries: Some(host_hint::ENTRIES),
            ..shape(names::BLOCK_HINTS, MapType::Array, 4, 8)
        },
    ]
}

/// Refuses pins left by an incompatible version rather than misreading them:
/// a map of the older layout (one table for both families), or a map whose
/// type, key, value or fixed size differs from this version's.
fn check_pinned_maps(dir: &Path) -> Result<(), KernelError> {
    for name in names::RETIRED {
        let path = dir.join(name);
        if path.exists() {
            return Err(KernelError::StaleMap {
                path,
                reason: "a map of the older layout, which kept IPv4 and IPv6 sources in one table; this version keeps each family in its own maps (BLOCK_V4, BLOCK_V6, …)".into(),
            });
        }
    }
    for shape in expected_maps() {
        let path = dir.join(shape.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| KernelError::PinPath {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let actual_type = info.map_type().map_err(|e| map_error(shape.name, e))?;
        if actual_type != shape.map_type
            || info.key_size() as usize != shape.key_size
            || info.value_size() as usize != shape.value_size
        {
            return Err(KernelError::StaleMap {
                path,
                reason: format!(
                    "found {actual_type:?} with {}-byte keys and {}-byte values, expected {:?} with {} and {}",
                    info.key_size(),
                    info.value_size(),
                    shape.map_type,
                    shape.key_size,
                    shape.value_size
                ),
            });
        }
        if let Some(expected) = shape.max_entries.filter(|n| *n != info.max_entries()) {
            return Err(KernelError::StaleMap {
                path,
                reason: format!("found {} entries, expected {expected}", info.max_entries()),
            });
        }
    }
    Ok(())
}

/// Where bpffs lives on every distribution that mounts it.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

fn prepare_pin_dir(dir: &Path) -> Result<(), KernelError> {
    // Hosts without systemd's mounts lack bpffs; pinning needs it, so mount
    // it where everyone expects it (as bpftool does).
    if dir.starts_with(BPF_FS_ROOT) && !is_bpffs(Path::new(BPF_FS_ROOT)) {
        mount_bpffs().map_err(|e| KernelError::PinPath {
            path: dir.to_owned(),
            reason: format!("{BPF_FS_ROOT} is not a bpf filesystem and mounting one failed: {e} (mount -t bpf bpf {BPF_FS_ROOT})"),
        })?;
        tracing::info!(path = BPF_FS_ROOT, "mounted the bpf filesystem");
    }
    std::fs::create_dir_all(dir).map_err(|e| KernelError::PinPath {
        path: dir.to_owned(),
        reason: format!("cannot create it: {e}"),
    })?;
    if !is_bpffs(dir) {
        return Err(KernelError::PinPath {
            path: dir.to_owned(),
            reason: format!("not on a bpf filesystem: use a directory under {BPF_FS_ROOT}"),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c_path.as_ptr(), &mut fs) }) == 0 && fs.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs() -> io::Result<()> {
    let (source, target, fs_type) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fs_type.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lock_pin_dir(dir: &Path) -> Result<File, KernelError> {
    let file = File::open(dir).map_err(|source| KernelError::Io {
        context: format!("opening pin path {}", dir.display()),
        source,
    })?;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.kind() == io::ErrorKind::WouldBlock {
            KernelError::AlreadyRunning {
                path: dir.to_owned(),
            }
        } else {
            KernelError::Io {
                context: format!("locking pin path {}", dir.display()),
                source: err,
            }
        });
    }
    Ok(file)
}

/// The first cgroup v2 mount in /proc/mounts (hosts differ: `/sys/fs/cgroup`
/// on unified systems, `/sys/fs/cgroup/unified` in hybrid mode).
fn cgroup2_root() -> Result<PathBuf, KernelError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| KernelError::Io {
        context: "reading /proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            (fs_type == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .next()
        .ok_or(KernelError::NoCgroup2)
}

/// The cookie of the calling thread's network namespace (Linux ≥ 5.14).
fn current_netns_cookie() -> Result<u64, KernelError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|source| KernelError::Io {
            context: "opening a socket to read the netns cookie".into(),
            source,
        })?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, out-pointer and length of a u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(KernelError::Io {
            context: "getsockopt(SO_NETNS_COOKIE) (Linux ≥ 5.14)".into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(cookie)
}

fn config_of(limits: &KernelLimits, netns_cookie: u64) -> Result<Config, KernelError> {
    if limits.ports.is_empty() || limits.ports.len() > MAX_PORTS {
        return Err(KernelError::Invalid(format!(
            "kernel.ports has {} ports: between 1 and {MAX_PORTS} are supported",
            limits.ports.len()
        )));
    }
    if limits.ipv6_prefix_len == 0 || limits.ipv6_prefix_len > 128 {
        return Err(KernelError::Invalid(format!(
            "limits.ipv6_prefix = {}: must be between 1 and 128",
            limits.ipv6_prefix_len
        )));
    }
    let mut ports = [0u16; MAX_PORTS];
    ports[..limits.ports.len()].copy_from_slice(&limits.ports);
    Ok(Config {
        max_connections: limits.max_connections,
        ipv6_prefix_len: u32::from(limits.ipv6_prefix_len),
        events_per_second: limits.events_per_second,
        port_count: limits.ports.len() as u32,
        mode: if limits.observe {
            Mode::Observe
        } else {
            Mode::Enforce
        } as u32,
        reserved: 0,
        ports,
        netns_cookie,
    })
}

/// Every entry of a hash map. Read in batches (`BPF_MAP_LOOKUP_BATCH`,
/// Linux ≥ 5.6): one syscall per few thousand entries instead of two per
/// entry, which is what makes the agent's periodic sweep and save of a
/// 1 M-entry `BLOCK` take a fraction of a second instead of seconds. Falls
/// back to reading entry by entry where the kernel has no batch operations.
fn hash_entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, MapError> {
    use aya::maps::IterableMap as _;
    use std::os::fd::AsFd as _;
    let fd = map.map().fd().as_fd().as_raw_fd();
    match lookup_batch(fd) {
        Ok(entries) => Ok(entries),
        Err(e) if batch_unsupported(&e) => map.iter().collect(),
        Err(io_error) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "BPF_MAP_LOOKUP_BATCH",
            io_error,
        })),
    }
}

/// [`hash_entries`] of the map `pick` chooses, through a duplicate of its
/// descriptor taken under the lock and read after the lock is released
/// (batch lookups only; without them, the walk holds the lock).
fn hash_entries_unlocked<K: aya::Pod, V: aya::Pod>(
    maps: &Mutex<Maps>,
    pick: impl Fn(&Maps) -> &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, MapError> {
    use aya::maps::IterableMap as _;
    use std::os::fd::AsFd as _;
    let fd = {
        let maps = lock(maps);
        pick(&maps).map().fd().as_fd().try_clone_to_owned()
    };
    match fd.map(|fd| lookup_batch(fd.as_raw_fd())) {
        Ok(Ok(entries)) => Ok(entries),
        Ok(Err(e)) if !batch_unsupported(&e) => {
            Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "BPF_MAP_LOOKUP_BATCH",
                io_error: e,
            }))
        }
        // No batch lookups (or no descriptor to spare): the walk under the lock.
        _ => hash_entries(pick(&lock(maps))),
    }
}

/// The kernel or the map type has no batch lookups (the caller walks the
/// map entry by entry instead).
fn batch_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP | libc::ENOSPC)
    )
}

/// `BPF_MAP_LOOKUP_BATCH` over a whole hash map (`union bpf_attr`'s
/// `batch` member; a hash map's batch token is a `u32` bucket index).
/// The kernel's own "operation not supported" (not in libc).
const ENOTSUPP: i32 = 524;

fn lookup_batch<K: aya::Pod, V: aya::Pod>(fd: i32) -> io::Result<Vec<(K, V)>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    /// Entries per call.
    const CHUNK: usize = 4096;
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    // SAFETY: `Pod` types are plain data, valid when zeroed.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut entries = Vec::new();
    let mut token: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token) as u64
            },
            out_batch: std::ptr::addr_of_mut!(next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `count` keys and values of the
        // map's key and value types, and at two live u32 batch tokens.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::addr_of_mut!(attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        let filled = (attr.count as usize).min(CHUNK);
        match error {
            None => {}
            // ENOENT: the last entries are in this answer.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                entries.extend(
                    keys[..filled]
                        .iter()
                        .copied()
                        .zip(values[..filled].iter().copied()),
                );
                return Ok(entries);
            }
            Some(e) => return Err(e),
        }
        entries.extend(
            keys[..filled]
                .iter()
                .copied()
                .zip(values[..filled].iter().copied()),
        );
        token = next;
        first = false;
    }
}

fn kernel_block(net: IpNet, block: &Block) -> KernelBlock {
    KernelBlock {
        net,
        origin: Reason::from_code(block.reason),
        expires: (block.expires_mono_ns != 0).then(|| mono_ns_to_system(block.expires_mono_ns)),
        drops: block.drops,
    }
}

fn load_program<P>(ebpf: &mut Ebpf, name: &'static str) -> Result<(), KernelError>
where
    for<'p> &'p mut P: TryFrom<&'p mut aya::programs::Program, Error = ProgramError>,
    P: LoadProgram,
{
    // The verifier gives up with EAGAIN when a signal reaches the loading
    // thread (a child process of the agent or of a test ending, SIGCHLD):
    // try again, as libbpf does.
    const ATTEMPTS: u32 = 5;
    let program = program_mut::<P>(ebpf, name)?;
    let mut attempt = 1;
    loop {
        match program.load_it() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            loaded => return loaded.map_err(|e| program_error(name, e)),
        }
    }
}

/// `load()` is inherent on each aya program type; this names it for generics.
trait LoadProgram {
    fn load_it(&mut self) -> Result<(), ProgramError>;
}
impl LoadProgram for Xdp {
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}
impl LoadProgram for SchedClassifier {
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}
impl LoadProgram for SockOps {
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

fn program_mut<'e, P>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut P, KernelError>
where
    for<'p> &'p mut P: TryFrom<&'p mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| KernelError::Program {
        program: name,
        message: "not in the eBPF object (object and agent from different versions?)".into(),
    })?;
    program.try_into().map_err(|e| program_error(name, e))
}

fn attach_tc(ebpf: &mut Ebpf, interface: &str) -> Result<(), KernelError> {
    // Before TCX (6.6) the classifier hangs off a clsact qdisc.
    let before_tcx = KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0));
    if before_tcx {
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            if !e.to_string().contains("exists") {
                tracing::debug!(interface, error = %e, "adding clsact qdisc");
            }
        }
    }
    program_mut::<SchedClassifier>(ebpf, program_names::TC)?
        .attach(interface, TcAttachType::Ingress)
        .map(drop)
        .map_err(|e| program_error(program_names::TC, e))
}

fn program_error(program: &'static str, error: ProgramError) -> KernelError {
    let message = match &error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "the verifier refused it ({io_error}); end of its log:\n{}",
                tail.join("\n")
            )
        }
        other => with_permission_hint(error_chain(other)),
    };
    KernelError::Program { program, message }
}

/// An error and its sources, without repeating a source its parent already
/// quotes.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(&format!(": {text}"));
        }
        source = s.source();
    }
    message
}

fn with_permission_hint(message: String) -> String {
    if message.contains("Operation not permitted") {
        format!("{message} (run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)")
    } else {
        message
    }
}

fn map_error(map: &'static str, error: MapError) -> KernelError {
    KernelError::Map {
        map,
        message: error.to_string(),
    }
}

/// E2BIG (hash) and ENOSPC (LPM trie) mean the map is full.
fn insert_error(
    map: &'static str,
    max_entries: u32,
    config_key: &'static str,
    error: MapError,
) -> KernelError {
    if let MapError::SyscallError(ref e) = error {
        if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
            return KernelError::MapFull {
                map,
                max_entries,
                config_key,
            };
        }
    }
    map_error(map, error)
}

fn absent_is_false(result: Result<(), MapError>, map: &'static str) -> Result<bool, KernelError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(map_error(map, e)),
    }
}

fn absent_is_none<T>(
    result: Result<T, MapError>,
    map: &'static str,
) -> Result<Option<T>, KernelError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(map_error(map, e)),
    }
}

fn absent_is_default<T: Default>(
    result: Result<T, MapError>,
    map: &'static str,
) -> Result<T, KernelError> {
    match result {
        Ok(v) => Ok(v),
        Err(e) if is_not_found(&e) => Ok(T::default()),
        Err(e) => Err(map_error(map, e)),
    }
}

fn is_not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the maps consistent (the kernel
    // owns them), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
