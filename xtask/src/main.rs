//! Developer tasks for smtp-limiter: `cargo xtask <subcommand>` (the alias is
//! in `.cargo/config.toml`).

mod build;
mod cmd;
mod demo;
mod fuzz;
mod package;
mod setup;
mod toolchain;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::build::Workspace;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "smtp-limiter developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build and test (idempotent)
    ///
    /// The nightly toolchain and its rust-src, cargo-fuzz, the LLVM and tool
    /// packages (Debian/Ubuntu, as root), and bpf-linker built for nightly's
    /// LLVM.
    Setup,
    /// Build the eBPF object (limiter-ebpf) with nightly and print its path.
    BuildEbpf {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build the eBPF object (release), then the smtp-limiter binary embedding it.
    Build {
        /// Build smtp-limiter in the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, then run smtp-limiter with ARGS (default: `run`).
    Run {
        /// Build and run smtp-limiter in the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for smtp-limiter, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build the eBPF object, then `cargo test --workspace --exclude limiter-ebpf ARGS`.
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, then show the product under attack in its own network
    /// namespaces: legitimate senders, a harvester, a null-sender flood, an
    /// AUTH brute-forcer, a relay prober, a reject-listed host and a SYN
    /// flood; prints a report, checks it, and removes everything it made.
    ///
    /// Needs root (namespaces, XDP, bpffs); without it, or without BPF, it
    /// says why and runs the userspace part on 127.0.0.x. Exits non-zero
    /// when a check fails.
    Demo {
        /// The short run (well under a minute), for CI.
        #[arg(long)]
        quick: bool,
        /// Keep the pinned maps at the end, to look at them with bpftool.
        #[arg(long)]
        keep: bool,
        /// Fail instead of running the userspace part when the kernel part cannot run.
        #[arg(long, conflicts_with = "userspace")]
        require_kernel: bool,
        /// Run only the userspace part (no namespaces, no BPF), even as root.
        #[arg(long)]
        userspace: bool,
        /// Also write the agent's log (JSON lines) to FILE.
        #[arg(long, value_name = "FILE")]
        agent_log: Option<std::path::PathBuf>,
    },
    /// Set up, then run the benchmarks (tests/src/bin/*-bench.rs), each with
    /// ARGS: limiter (BPF per-packet cost), proxy (SMTP through the proxy),
    /// recipients (LDAP directory), attack, state, syn, filters and flood
    /// (legitimate mail under a distributed flood, against Postfix alone and
    /// postscreen). The eBPF object, and the release agent for those that
    /// run it, are built first.
    ///
    /// `-- --only NAME` runs one of them; options only one benchmark knows
    /// need it (`--quick`, `--rounds N` and `--out DIR` are understood by
    /// the benchmarks on the shared harness). See BENCHMARKS.md.
    Bench {
        /// Arguments for the benchmarks, after `--`: `--only NAME` (limiter,
        /// proxy, recipients, attack, state, syn, filters, flood), then the
        /// benchmark's own (`--help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build the release binary, and make the Debian package
    /// (target/debian/smtp-limiter_VERSION_ARCH.deb): binary with the kernel
    /// object embedded, systemd unit, configuration (conffile), man pages,
    /// shell completions, licences. Prints the package's path.
    Package {
        /// Package this already-built smtp-limiter instead of building one
        /// (it must embed the kernel object); nothing is built, no setup.
        #[arg(long, value_name = "FILE")]
        binary: Option<std::path::PathBuf>,
        /// Directory for the package (and its staged tree).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Build the fuzz targets (`fuzz/`, libFuzzer via cargo-fuzz, nightly)
    /// and run each one for SECONDS on a scratch copy of its seed corpus
    /// (with --replay: each committed input once); prints the executions
    /// per target and fails when one crashes (the input is kept in
    /// target/fuzz-artifacts/TARGET/).
    Fuzz {
        /// How long each target runs, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run every input of the committed corpus (fuzz/corpus/TARGET)
        /// once and nothing else: the same outcome on every run of the
        /// same tree (what CI does).
        #[arg(long, conflicts_with_all = ["seconds", "keep"])]
        replay: bool,
        /// After fuzzing, add the fewest inputs that reach the new code to
        /// the committed corpus (libFuzzer's -set_cover_merge=1 over
        /// edges), for the replay.
        #[arg(long)]
        keep: bool,
        /// Run only this target (`cargo +nightly fuzz list` in fuzz/ lists them).
        #[arg(long)]
        target: Option<String>,
        /// The sanitizer to build with (cargo-fuzz's `--sanitizer`: none,
        /// address, leak, memory or thread). The code under test is safe
        /// Rust, so the default is none: panics, integer overflows
        /// (debug assertions are on), hangs and memory blow-ups are what
        /// the targets find; ASan costs build and run time for nothing it
        /// could catch there.
        #[arg(long, default_value = "none")]
        sanitizer: String,
        /// Run this many targets at the same time (0: one per CPU).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // Exit as the failed child did (e.g. `cargo test`'s 101).
            let code = err
                .chain()
                .find_map(|e| e.downcast_ref::<cmd::ChildFailed>())
                .and_then(|failed| failed.code)
                .and_then(|code| u8::try_from(code).ok())
                .filter(|&code| code != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf { debug } => {
            let ws = Workspace::locate()?;
            let object = build::build_ebpf(&ws, !debug)?;
            println!("{}", object.display());
            Ok(())
        }
        Task::Build { release } => build::build(&Workspace::locate()?, release),
        // The README's commands must work on a fresh machine by themselves:
        // they install what is missing first (quick when nothing is).
        Task::Run { release, args } => {
            setup::setup()?;
            build::run(&Workspace::locate()?, release, &args).map(|never| match never {})
        }
        Task::Test { args } => {
            setup::setup()?;
            build::test(&Workspace::locate()?, &args)
        }
        Task::Demo {
            quick,
            keep,
            require_kernel,
            userspace,
            agent_log,
        } => demo::demo(
            &Workspace::locate()?,
            &demo::Options {
                quick,
                keep,
                require_kernel,
                userspace,
                agent_log,
            },
        ),
        Task::Fuzz {
            seconds,
            replay,
            keep,
            target,
            sanitizer,
            jobs,
        } => {
            setup::ensure_cargo_fuzz()?;
            fuzz::fuzz(
                &Workspace::locate()?,
                &fuzz::Options {
                    target,
                    sanitizer,
                    mode: if replay {
                        fuzz::Mode::Replay
                    } else {
                        fuzz::Mode::Fuzz { seconds, keep }
                    },
                    jobs: if jobs == 0 {
                        std::thread::available_parallelism().map_or(1, usize::from)
                    } else {
                        jobs
                    },
                },
            )
        }
        Task::Package { binary, out } => {
            if binary.is_none() {
                setup::setup()?;
            }
            let deb = package::package(&package::Options { binary, out })?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Bench { args } => {
            setup::setup()?;
            build::bench(&Workspace::locate()?, &args)
        }
    }
}
