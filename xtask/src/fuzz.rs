//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with nightly
//! and runs each one for a while on a scratch copy of its committed seed
//! corpus (or, with `--replay`, runs each committed input once: what CI
//! does, the same every time), then prints how many inputs each one ran. A
//! crash (a panic, an overflow, a timeout, running out of memory) fails the
//! task, and the input that caused it is kept under
//! `target/fuzz-artifacts/<target>/`. With `--keep`, the fewest inputs of a
//! run that reach the code it found join the committed corpus (libFuzzer's
//! `-set_cover_merge=1` over edges), so that the replay covers it from then
//! on.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::build::Workspace;
use crate::cmd;
use crate::toolchain;

/// What `cargo xtask fuzz` was asked to do.
pub struct Options {
    /// Only this target (`None`: all of them).
    pub target: Option<String>,
    /// The sanitizer cargo-fuzz builds with (`address`, `none`, …).
    pub sanitizer: String,
    /// How many targets run at the same time.
    pub jobs: usize,
    /// What each target does with its inputs.
    pub mode: Mode,
}

/// Fuzz for a while, or only replay the committed corpus.
#[derive(Clone, Copy)]
pub enum Mode {
    /// Run every committed input once and stop: no new inputs, so the
    /// outcome depends on the tree alone.
    Replay,
    /// Fuzz for `seconds` per target; with `keep`, merge the new coverage
    /// into the committed corpus afterwards.
    Fuzz { seconds: u64, keep: bool },
}

/// Longest input libFuzzer makes, per target: SMTP lines, replies and
/// bodies need a few kilobytes to cross every limit (512-byte command
/// lines, 1000-byte text lines, 4096-byte reply lines); a configuration
/// file is longer.
fn max_len(target: &str) -> usize {
    match target {
        "config" => 16384,
        _ => 4096,
    }
}

/// A target's outcome.
struct Run {
    target: String,
    executions: Option<u64>,
    seconds: f64,
    corpus: Option<u64>,
    /// `None` when it ran clean; otherwise what went wrong.
    failure: Option<String>,
}

pub fn fuzz(ws: &Workspace, opts: &Options) -> Result<()> {
    let fuzz_dir = ws.root.join("fuzz");
    let triple = host_triple()?;
    let targets = list_targets(&fuzz_dir)?;
    let chosen: Vec<String> = match &opts.target {
        Some(name) if targets.contains(name) => vec![name.clone()],
        Some(name) => bail!(
            "no fuzz target {name:?}; the targets are: {}",
            targets.join(", ")
        ),
        None => targets,
    };

    let started = Instant::now();
    let mut build = toolchain::cargo_nightly();
    build
        .args(["fuzz", "build", "--release", "--debug-assertions"])
        .args(["--sanitizer", &opts.sanitizer, "--target", &triple])
        // cargo-fuzz forces one codegen unit per crate in release builds (for
        // ThinLTO inlining); on small machines that makes the cold build of
        // the agent's dependencies take minutes longer, for no measurable
        // difference in executions per second here.
        .args(["--codegen-units", "16"])
        .args(opts.target.iter())
        .current_dir(&fuzz_dir);
    cmd::run(&mut build).context(
        "the fuzz targets do not build (cargo-fuzz and the nightly toolchain come from \
         `cargo xtask setup`)",
    )?;
    let build_secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz: built {} target(s) in {build_secs:.0} s",
        chosen.len()
    );

    let bin_dir = fuzz_dir.join("target").join(&triple).join("release");
    let artifacts = ws.target_dir.join("fuzz-artifacts");
    let scratch = ws.target_dir.join("fuzz-corpus");
    // Up to `jobs` targets at a time, each a single libFuzzer process;
    // results in the order of the list.
    let next = std::sync::Mutex::new(chosen.iter().enumerate());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.clamp(1, chosen.len()) {
            scope.spawn(|| loop {
                let Some((i, target)) = next.lock().expect("queue").next() else {
                    return;
                };
                let run = run_target(
                    &bin_dir.join(target),
                    target,
                    &Inputs {
                        seeds: fuzz_dir.join("corpus").join(target),
                        dictionary: Some(fuzz_dir.join("dict").join(format!("{target}.dict")))
                            .filter(|d| d.is_file()),
                        scratch: scratch.join(target),
                        artifacts: artifacts.join(target),
                    },
                    opts.mode,
                );
                results.lock().expect("results").push((i, run));
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|(i, _)| *i);
    let runs = results
        .into_iter()
        .map(|(_, run)| run)
        .collect::<Result<Vec<Run>>>()?;

    println!();
    println!(
        "{:<14} {:>14} {:>10} {:>8} {:>8}  result",
        "target", "executions", "exec/s", "seconds", "corpus"
    );
    for run in &runs {
        let execs = run.executions.map_or("?".to_owned(), group);
        let rate = match run.executions {
            Some(n) if run.seconds > 0.0 => group((n as f64 / run.seconds) as u64),
            _ => "?".to_owned(),
        };
        let corpus = run.corpus.map_or("?".to_owned(), |c| c.to_string());
        let result = run.failure.as_deref().unwrap_or("ok");
        println!(
            "{:<14} {execs:>14} {rate:>10} {:>8.0} {corpus:>8}  {result}",
            run.target, run.seconds
        );
    }
    println!(
        "fuzz: {} target(s), {:.0} s in all (build {build_secs:.0} s)",
        runs.len(),
        started.elapsed().as_secs_f64()
    );

    let failed: Vec<&Run> = runs.iter().filter(|r| r.failure.is_some()).collect();
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|r| r.target.as_str()).collect();
        bail!(
            "fuzz target(s) {} crashed; the inputs are in {} (reproduce with `cd fuzz && \
             cargo +nightly fuzz run TARGET ../target/fuzz-artifacts/TARGET/crash-…`, then add \
             the input to fuzz/corpus/TARGET/ once fixed)",
            names.join(", "),
            artifacts.display()
        );
    }
    Ok(())
}

/// Where a target's inputs come from and its findings go.
struct Inputs {
    /// The committed seed corpus (`fuzz/corpus/<target>`).
    seeds: PathBuf,
    /// A libFuzzer dictionary (`fuzz/dict/<target>.dict`), if there is one.
    dictionary: Option<PathBuf>,
    /// The working corpus: a fresh copy of the seeds, grown by the run, so
    /// the committed tree stays clean.
    scratch: PathBuf,
    /// Crashing inputs (`-artifact_prefix`); the log is `<artifacts>.log`.
    artifacts: PathBuf,
}

/// Runs one target on a fresh copy of its seeds, fuzzing for a while or
/// running each seed once (`mode`); its log goes to `<artifacts>.log` and
/// the lines that matter to the terminal.
fn run_target(binary: &Path, target: &str, inputs: &Inputs, mode: Mode) -> Result<Run> {
    let Inputs {
        seeds,
        dictionary,
        scratch,
        artifacts,
    } = inputs;
    if scratch.exists() {
        fs::remove_dir_all(scratch)
            .with_context(|| format!("cannot empty {}", scratch.display()))?;
    }
    fs::create_dir_all(scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    fs::create_dir_all(artifacts)
        .with_context(|| format!("cannot create {}", artifacts.display()))?;
    let mut seeded = 0;
    if seeds.is_dir() {
        for entry in
            fs::read_dir(seeds).with_context(|| format!("cannot read {}", seeds.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::copy(entry.path(), scratch.join(entry.file_name()))
                    .with_context(|| format!("cannot copy {}", entry.path().display()))?;
                seeded += 1;
            }
        }
    }
    match mode {
        Mode::Replay => println!("fuzz: {target}, replaying {seeded} seeds"),
        Mode::Fuzz { seconds, .. } => {
            println!("fuzz: {target} for {seconds} s ({seeded} seeds)")
        }
    }

    let log_path = artifacts.with_extension("log");
    let mut prefix = artifacts.as_os_str().to_owned();
    prefix.push("/");
    let mut command = Command::new(binary);
    command.arg(scratch);
    match mode {
        // Loading the corpus runs every input in it; then it stops.
        Mode::Replay => command.arg("-runs=0"),
        Mode::Fuzz { seconds, .. } => command.arg(format!("-max_total_time={seconds}")),
    };
    command
        .arg(format!("-max_len={}", max_len(target)))
        // One input may take this long (a hang is a crash); memory as well.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .args(dictionary.iter().map(|d| {
            let mut arg = std::ffi::OsString::from("-dict=");
            arg.push(d);
            arg
        }))
        .arg({
            let mut arg = std::ffi::OsString::from("-artifact_prefix=");
            arg.push(&prefix);
            arg
        })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    eprintln!("$ {}", cmd::display(&command));
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut log = Vec::new();
    let mut in_dictionary = false;
    for line in BufReader::new(stderr).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        // The fuzzer's progress lines and its recommended dictionary are
        // many (they stay in the log file); the rest is worth showing.
        if line.starts_with("###### Recommended dictionary") {
            in_dictionary = true;
        }
        let quiet = in_dictionary
            || line.starts_with('#')
            || line.starts_with("INFO:")
            || line.starts_with("stat::")
            || line.starts_with("MS:")
            || line.starts_with("base unit:")
            || line.starts_with("0x")
            // Without a sanitizer, libFuzzer says it misses the sanitizer's
            // hooks, three lines per run.
            || line.starts_with("WARNING: Failed to find function \"__sanitizer_");
        if line.starts_with("###### End of recommended dictionary") {
            in_dictionary = false;
        }
        if !quiet {
            println!("  {target}: {line}");
        }
        log.push(line);
    }
    let status = child.wait()?;
    let seconds = started.elapsed().as_secs_f64();
    fs::write(&log_path, log.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", log_path.display()))?;

    let stat = |name: &str| {
        log.iter()
            .rev()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    // `Done 123 runs in 20 second(s)` when the time is up.
    let done = log.iter().rev().find_map(|l| {
        let rest = l.strip_prefix("Done ")?;
        rest.split_whitespace().next()?.parse::<u64>().ok()
    });
    let executions = stat("stat::number_of_executed_units:").or(done);
    let corpus = log.iter().rev().find_map(|l| {
        let (_, after) = l.split_once(" corp: ")?;
        after.split('/').next()?.trim().parse::<u64>().ok()
    });
    let failure = if status.success() {
        None
    } else {
        let artifact = log.iter().find_map(|l| {
            l.split_once("Test unit written to ")
                .map(|(_, p)| p.trim().to_owned())
        });
        Some(match artifact {
            Some(path) => format!(
                "CRASHED ({status}); input: {path}; log: {}",
                log_path.display()
            ),
            None => format!("FAILED ({status}); log: {}", log_path.display()),
        })
    };
    if let Some(failure) = &failure {
        println!("fuzz: {target} {failure}");
    } else if matches!(mode, Mode::Fuzz { keep: true, .. }) {
        let added = merge_into(binary, target, seeds, scratch)?;
        println!(
            "fuzz: {target}: {added} new input(s) kept in {}",
            seeds.display()
        );
    }
    Ok(Run {
        target: target.to_owned(),
        executions,
        seconds,
        corpus,
        failure,
    })
}

/// Merges the inputs of `scratch` that reach code `seeds` does not into
/// `seeds`, and returns how many files `seeds` gained. libFuzzer's
/// `-set_cover_merge=1` over edges alone (`-use_counters=0`): the fewest
/// inputs that cover every new edge. With hit counts as well, every count
/// bucket of every edge keeps its own input: measured on `control` after
/// 3 minutes, 3 082 inputs (373 KB) against 498 (46 KB) for 4 462 and
/// 4 461 covered edges.
fn merge_into(binary: &Path, target: &str, seeds: &Path, scratch: &Path) -> Result<usize> {
    let count = |dir: &Path| fs::read_dir(dir).map_or(0, |entries| entries.count());
    fs::create_dir_all(seeds).with_context(|| format!("cannot create {}", seeds.display()))?;
    let before = count(seeds);
    let mut merge = Command::new(binary);
    merge
        .arg("-set_cover_merge=1")
        .arg("-use_counters=0")
        .arg(format!("-max_len={}", max_len(target)))
        .arg(seeds)
        .arg(scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = merge
        .status()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    if !status.success() {
        bail!(
            "merging {target}'s new inputs into {} failed ({status})",
            seeds.display()
        );
    }
    Ok(count(seeds).saturating_sub(before))
}

/// The fuzz targets, as `cargo fuzz list` gives them.
fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let mut list = toolchain::cargo_nightly();
    list.args(["fuzz", "list"]).current_dir(fuzz_dir);
    let line = cmd::display(&list);
    let out = list.stderr(Stdio::inherit()).output().with_context(|| {
        format!("cannot start `{line}` (is cargo-fuzz installed? `cargo xtask setup`)")
    })?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}); `cargo xtask setup` installs cargo-fuzz",
            out.status
        );
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("`{line}` lists no fuzz target in {}", fuzz_dir.display());
    }
    Ok(targets)
}

/// The host triple of the nightly toolchain (cargo-fuzz builds for it and
/// puts the binaries under `fuzz/target/<triple>/release/`).
fn host_triple() -> Result<String> {
    let rustc_path = toolchain::find_in_path("rustc")
        .unwrap_or_else(|| toolchain::cargo_home().join("bin").join("rustc"));
    let mut rustc = Command::new(rustc_path);
    rustc
        .arg(format!("+{}", toolchain::NIGHTLY))
        .arg("-vV")
        .env("RUSTUP_AUTO_INSTALL", "0");
    let out = cmd::probe(&mut rustc).context(
        "`rustc +nightly -vV` failed: run `cargo xtask setup` for the nightly toolchain",
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("host:"))
        .map(|h| h.trim().to_owned())
        .context("`rustc +nightly -vV` printed no `host:` line")
}

/// `1234567` as `1 234 567`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}
