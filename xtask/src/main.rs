//! Developer tasks for smtp-limiter: `cargo xtask <subcommand>` (the alias is
//! in `.cargo/config.toml`).

mod build;
mod cmd;
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
    /// The nightly toolchain and its rust-src, the LLVM and tool packages
    /// (Debian/Ubuntu, as root), and bpf-linker built for nightly's LLVM.
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
    /// Set up, build the eBPF object, then run the limiter-bench benchmark with ARGS.
    Bench {
        /// Arguments for limiter-bench, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
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
        Task::Bench { args } => {
            setup::setup()?;
            build::bench(&Workspace::locate()?, &args)
        }
    }
}
