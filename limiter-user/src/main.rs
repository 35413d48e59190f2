//! `smtp-limiter`: the agent and its command line. Commands other than `run`
//! and `check-config` talk to the running agent over its control socket;
//! when it is not running, `block list`, `allow list` and `stats` read the
//! pinned kernel maps directly (and say so), and changes are refused. Every
//! command reads [`DEFAULT_CONFIG_PATH`] unless `--config` names a file.
//!
//! `smtp-limiter generate man|completions` (hidden, for packaging) writes
//! the man pages and shell completions from these definitions.

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use limiter_user::{
    agent,
    blocks::{origin_name, parse_origin, Reason},
    commands,
    config::{self, Config},
    control::{
        self, AllowChanged, BlockAdded, BlockCheck, BlockPage, BlockRemoved, BlockRow, ClientError,
        Entry, Imported, LimitSet, LimitsShown, Match, RecipientCheck, Reloaded, Request, Stats,
        Top,
    },
    exchange::{self, Format},
    kernel::{BpfDatapath, Datapath},
    recipients::{RecipientStats, RefreshReport},
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// Where the agent and the CLI read their configuration unless `--config`
/// names another file (the Debian package installs it as a conffile).
const DEFAULT_CONFIG_PATH: &str = "/etc/smtp-limiter/smtp-limiter.toml";

#[derive(Parser)]
#[command(
    name = "smtp-limiter",
    version,
    about = "An edge guard for mail servers: kernel drops and SMTP limits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Configuration file (TOML) [default: /etc/smtp-limiter/smtp-limiter.toml].
    /// The CLI reads the control socket and pin path from it.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    ///
    /// Example: smtp-limiter run --config /etc/smtp-limiter/smtp-limiter.toml
    Run {
        /// Load the kernel object from this file instead of the embedded one.
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
        /// Log lines as text (no colours unless stderr is a terminal and
        /// NO_COLOR is unset; no timestamps under journald) or JSON. The
        /// level is state.log_level; RUST_LOG overrides it.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Same as --log-format json (kept for scripts that use it).
        #[arg(long, hide = true)]
        json_logs: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Validate a configuration and print the effective one; non-zero exit
    /// on error.
    ///
    /// Example: smtp-limiter check-config --config /etc/smtp-limiter/smtp-limiter.toml
    CheckConfig {
        #[command(flatten)]
        common: Common,
    },
    /// Blocked addresses and networks.
    #[command(subcommand)]
    Block(BlockCommand),
    /// Allow-listed networks (never blocked or limited).
    #[command(subcommand)]
    Allow(AllowCommand),
    /// Limits in force, and changing them live.
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// Valid recipients from the LDAP directory ([recipients.ldap]).
    #[command(subcommand)]
    Recipients(RecipientsCommand),
    /// Kernel counters and proxy counters.
    ///
    /// Example: smtp-limiter stats --json
    Stats {
        #[command(flatten)]
        common: Common,
    },
    /// The busiest sources: connections held, kernel drops, refusals.
    ///
    /// Example: smtp-limiter top --once
    Top {
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between frames.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Make the agent re-read its configuration file; a bad file is refused
    /// with its errors and the running configuration stays.
    ///
    /// Example: smtp-limiter reload
    Reload {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum BlockCommand {
    /// Block an address or network.
    ///
    /// Example: smtp-limiter block add 198.51.100.7 --for 2h --reason "ticket 4711: spam run"
    Add {
        net: String,
        /// How long; without it the block lasts until removed.
        #[arg(long = "for", value_parser = config::parse_duration)]
        duration: Option<Duration>,
        /// Why, in free text, kept beside the origin and shown by `block
        /// list` and `block check` (at most 500 characters). An origin name
        /// alone (`--reason harvest`) sets the origin, as in earlier versions.
        #[arg(long)]
        reason: Option<String>,
        /// What ordered the block: manual (default), harvest, auth, flood,
        /// reject-list, relay, filter or network.
        #[arg(long)]
        origin: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a block.
    ///
    /// Example: smtp-limiter block del 198.51.100.7
    Del {
        net: String,
        #[command(flatten)]
        common: Common,
    },
    /// List blocks and reject-list entries: network, origin, expiry, reason.
    /// Reject-list entries come first, then blocks by expiry (soonest
    /// first); the agent answers a page at a time, so a million blocks
    /// never hold it up.
    ///
    /// Example: smtp-limiter block list --origin harvest --limit 20
    List {
        /// Only this origin (manual, harvest, auth, flood, reject-list,
        /// relay, filter, network).
        #[arg(long)]
        origin: Option<String>,
        /// Only entries that contain this address or network.
        #[arg(long, value_name = "ADDR")]
        covering: Option<String>,
        /// At most this many entries.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Whether and why an address is dropped: the block, reject-list entry
    /// or connection cap that covers it, or the allow-list entry that
    /// exempts it. Exit status 0 when it is dropped, 1 when it is not, 2 on
    /// error.
    ///
    /// Example: smtp-limiter block check 198.51.100.7
    Check {
        address: String,
        #[command(flatten)]
        common: Common,
    },
    /// Block every address or network of a file: plain (one a line, #
    /// comments), CSV or JSON as CrowdSec's `cscli decisions import` takes
    /// them (columns value, duration, reason, origin, scope, type, expires,
    /// since). `-` reads standard input. Nothing is imported if a line is bad.
    ///
    /// Example: fail2ban-client get sshd banip | tr ' ' '\n' | smtp-limiter block import - --for 1d --reason "fail2ban sshd"
    Import {
        /// The file, or - for standard input.
        file: PathBuf,
        /// plain, csv or json (default: by the file's extension, plain
        /// otherwise).
        #[arg(long, value_parser = parse_format)]
        format: Option<Format>,
        /// How long, for entries whose file gives no duration or expiry;
        /// without it they last until removed.
        #[arg(long = "for", value_parser = config::parse_duration)]
        duration: Option<Duration>,
        /// The origin of entries whose file names none of ours (default
        /// manual).
        #[arg(long)]
        origin: Option<String>,
        /// The reason of entries whose file gives none.
        #[arg(long)]
        reason: Option<String>,
        /// Read and check the file, say what would be imported, change
        /// nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Write the blocks (not the reject lists' entries, which are files or
    /// configuration already) as plain (one a line), CSV or JSON, which
    /// `block import` and CrowdSec's `cscli decisions import` read.
    ///
    /// Example: smtp-limiter block export --format csv -o blocks.csv
    Export {
        /// plain, csv or json.
        #[arg(long, default_value = "plain", value_parser = parse_format)]
        format: Format,
        /// Only this origin.
        #[arg(long)]
        origin: Option<String>,
        /// Write here instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum AllowCommand {
    /// Allow-list an address or network (live; add it to lists.allow to keep it).
    ///
    /// Example: smtp-limiter allow add 10.0.0.0/8
    Add {
        net: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove an allow-list entry.
    ///
    /// Example: smtp-limiter allow del 10.0.0.0/8
    Del {
        net: String,
        #[command(flatten)]
        common: Common,
    },
    /// List allow-list entries.
    ///
    /// Example: smtp-limiter allow list
    List {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum RecipientsCommand {
    /// Whether an address is a known recipient: exit status 0 when the
    /// directory holds it, 1 when it does not (unknown, or a domain or
    /// address the directory does not cover), 2 on error; like `postmap -q`.
    ///
    /// Example: smtp-limiter recipients check alice@example.com
    Check {
        address: String,
        #[command(flatten)]
        common: Common,
    },
    /// Addresses loaded, last refresh, last error.
    ///
    /// Example: smtp-limiter recipients stats --json
    Stats {
        #[command(flatten)]
        common: Common,
    },
    /// Refresh from the directory now.
    ///
    /// Example: smtp-limiter recipients refresh
    Refresh {
        /// Apply the result even if it shrinks the set past recipients.ldap.max_drop.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum LimitsCommand {
    /// Show the limits in force.
    ///
    /// Example: smtp-limiter limits show --json
    Show {
        #[command(flatten)]
        common: Common,
    },
    /// Change a limit live (kernel and proxy at once; the file is unchanged).
    ///
    /// Example: smtp-limiter limits set max_failed_rcpt 3
    Set {
        /// The [limits] key to change.
        #[arg(value_parser = live_limit_names())]
        name: String,
        /// Its new value, written as in the configuration file.
        value: String,
        #[command(flatten)]
        common: Common,
    },
}

/// The names `limits set` takes, each with its help, from
/// [`config::LIVE_LIMITS`] (so the help, man page and completions list them).
fn live_limit_names() -> clap::builder::PossibleValuesParser {
    config::LIVE_LIMITS
        .iter()
        .map(|limit| clap::builder::PossibleValue::new(limit.name).help(limit.help()))
        .collect::<Vec<_>>()
        .into()
}

/// Fish completions of `limits set NAME`: clap_complete's fish script
/// completes no positional argument's values (bash and zsh get them).
fn fish_limit_names() -> String {
    config::LIVE_LIMITS
        .iter()
        .map(|limit| {
            format!(
                "complete -c smtp-limiter -n \"__fish_smtp_limiter_using_subcommand limits; and __fish_seen_subcommand_from set\" -f -a \"{}\" -d '{}'\n",
                limit.name,
                limit.help().replace('\\', "\\\\").replace('\'', "\\'")
            )
        })
        .collect()
}

/// How the agent writes its log lines.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `smtp-limiter generate …`: kept out of [`Cli`] so that the help, the man
/// pages and the completions do not show it.
#[derive(Parser)]
#[command(
    name = "smtp-limiter generate",
    bin_name = "smtp-limiter generate",
    about = "Write the man pages or shell completions of smtp-limiter (for packaging)"
)]
enum Generate {
    /// Write smtp-limiter.8 and one page per subcommand into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print the completion script for SHELL.
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "generate") {
        return report(generate(Generate::parse_from(std::env::args_os().skip(1))));
    }
    // `--version` says whether the kernel programs are built in (packaging
    // refuses a binary without them).
    let long_version = format!(
        "{} ({})",
        env!("CARGO_PKG_VERSION"),
        if limiter_user::kernel::has_embedded_object() {
            "kernel programs embedded"
        } else {
            "no kernel programs embedded: run --ebpf-object FILE or kernel.mode = \"off\""
        }
    );
    // Leaked once: clap keeps `&'static str`s (its `string` feature is not on).
    let long_version: &'static str = Box::leak(long_version.into_boxed_str());
    let matches = Cli::command().long_version(long_version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if !matches!(cli.command, Command::Run { .. }) {
        // A CLI whose output goes into `head` should end quietly, not panic
        // on EPIPE (the agent keeps Rust's default: SIGPIPE ignored).
        // SAFETY: restoring the default disposition of a signal.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    report(dispatch(cli.command))
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtp-limiter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn generate(what: Generate) -> anyhow::Result<()> {
    match what {
        Generate::Man { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            // Section 8: a daemon and its administration tool.
            let mut cli = Cli::command().disable_help_subcommand(true);
            cli.build();
            write_man_pages(&cli, &out)
        }
        Generate::Completions { shell } => {
            let mut cli = Cli::command();
            clap_complete::generate(shell, &mut cli, "smtp-limiter", &mut std::io::stdout());
            if shell == clap_complete::Shell::Fish {
                print!("{}", fish_limit_names());
            }
            Ok(())
        }
    }
}

/// The sections of smtp-limiter.8 that clap does not know (roff).
const MAN_FILES: &str = r#".SH FILES
.TP
\fI/etc/smtp-limiter/smtp-limiter.toml\fR
The configuration, read by the agent and by every command unless \fB\-\-config\fR names another file.
.TP
\fI/var/lib/smtp-limiter/\fR
Stored blocks (\fBstate.directory\fR).
.TP
\fI/run/smtp-limiter/control.sock\fR
The control socket the commands talk to (\fBcontrol.socket\fR).
.TP
\fI/sys/fs/bpf/smtp-limiter/\fR
The pinned kernel maps (\fBkernel.pin_path\fR), readable with \fBbpftool map dump pinned\fR.
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter of the agent (e.g. \fBdebug\fR or \fBinfo,limiter_user::proxy=debug\fR); overrides \fBstate.log_level\fR.
.TP
\fBNO_COLOR\fR
When set and not empty, log lines carry no colour codes (they carry none anyway unless stderr is a terminal).
.TP
\fBJOURNAL_STREAM\fR
Set by systemd: under journald the agent writes no timestamps and prefixes each line with its syslog priority.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fBType=notify\fR: the agent sends READY=1 once its blocks are restored and its listeners are up.
.SH SIGNALS
\fBSIGHUP\fR reloads the configuration file (as \fBsmtp\-limiter reload\fR does); \fBSIGTERM\fR and \fBSIGINT\fR stop the agent after open sessions finish.
.SH SEE ALSO
\fBbpftool\fR(8), \fBsystemctl\fR(1), \fBjournalctl\fR(1)
"#;

/// One page for `command` and one for each of its subcommands, recursively
/// (`smtp-limiter-block-add.8`).
fn write_man_pages(command: &clap::Command, out: &Path) -> anyhow::Result<()> {
    let man = clap_mangen::Man::new(command.clone())
        .section("8")
        .manual("smtp-limiter manual");
    let path = out.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    if command.get_name() == "smtp-limiter" {
        page.extend_from_slice(MAN_FILES.as_bytes());
    }
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, out)?;
    }
    Ok(())
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            ebpf_object,
            log_format,
            json_logs,
            common,
        } => {
            let (path, config) = load_config_from(&common)?;
            let json = json_logs || log_format == LogFormat::Json;
            init_logging(json, &config.state.log_level)?;
            tracing::info!(path = %path.display(), version = env!("CARGO_PKG_VERSION"), "configuration loaded");
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(agent::run(config, Some(path), ebpf_object))
        }
        Command::CheckConfig { common } => {
            let mut loaded = load_config(&common)?;
            loaded.lists.read_files()?;
            print!(
                "{}",
                loaded
                    .redacted()
                    .to_toml()
                    .context("printing the configuration")?
            );
            eprintln!("configuration is valid");
            Ok(())
        }
        Command::Block(BlockCommand::Add {
            net,
            duration,
            reason,
            origin,
            common,
        }) => {
            let (origin, comment) = add_origin(origin.as_deref(), reason.as_deref())?;
            let data: BlockAdded = change(
                &common,
                Request::BlockAdd {
                    net,
                    duration_secs: duration.map(|d| d.as_secs()),
                    origin: origin.clone(),
                    comment: comment.clone(),
                },
            )?;
            let net = &data.net;
            let why = match &comment {
                Some(text) => format!("{origin}: {text}"),
                None => origin,
            };
            match duration {
                Some(d) => println!(
                    "blocked {net} for {} ({why}); kernel: {}",
                    humantime::format_duration(d),
                    data.kernel
                ),
                None => println!(
                    "blocked {net} until removed ({why}); kernel: {}",
                    data.kernel
                ),
            }
            Ok(())
        }
        Command::Block(BlockCommand::Del { net, common }) => {
            let data: BlockRemoved = change(&common, Request::BlockDel { net })?;
            match data.still_listed {
                Some(list) => println!(
                    "unblocked {}; it stays dropped by its reject-list entry ({list})",
                    data.net
                ),
                None => println!("unblocked {}", data.net),
            }
            Ok(())
        }
        Command::Block(BlockCommand::List {
            origin,
            covering,
            limit,
            common,
        }) => block_list(&common, origin, covering, limit),
        Command::Block(BlockCommand::Check { address, common }) => {
            answer(block_check(&common, address))
        }
        Command::Block(BlockCommand::Import {
            file,
            format,
            duration,
            origin,
            reason,
            dry_run,
            common,
        }) => block_import(&common, &file, format, duration, origin, reason, dry_run),
        Command::Block(BlockCommand::Export {
            format,
            origin,
            output,
            common,
        }) => block_export(&common, format, origin, output),
        Command::Allow(AllowCommand::Add { net, common }) => {
            let data: AllowChanged = change(&common, Request::AllowAdd { net })?;
            println!(
                "allowed {} (live; add it to lists.allow to keep it)",
                data.net
            );
            Ok(())
        }
        Command::Allow(AllowCommand::Del { net, common }) => {
            let data: AllowChanged = change(&common, Request::AllowDel { net })?;
            println!("removed {} from the allow list (live)", data.net);
            Ok(())
        }
        Command::Allow(AllowCommand::List { common }) => {
            let nets: Vec<String> = read(&common, Request::AllowList, |pins| {
                Ok(pins.allows()?.iter().map(ToString::to_string).collect())
            })?;
            if common.json {
                println!("{}", serde_json::to_string_pretty(&nets)?);
            } else {
                nets.iter().for_each(|n| println!("{n}"));
            }
            Ok(())
        }
        Command::Limits(LimitsCommand::Show { common }) => {
            let data: LimitsShown = change(&common, Request::LimitsShow)?;
            print_value(&common, &data)?;
            Ok(())
        }
        Command::Limits(LimitsCommand::Set {
            name,
            value,
            common,
        }) => {
            let data: LimitSet = change(&common, Request::LimitsSet { name, value })?;
            println!(
                "{} = {}: in force now, in the kernel and the proxy. Not persisted: {}",
                data.name, data.value, data.note
            );
            Ok(())
        }
        Command::Recipients(RecipientsCommand::Check { address, common }) => answer(
            change(&common, Request::RecipientsCheck { address }).and_then(
                |data: RecipientCheck| {
                    print_value(&common, &data)?;
                    Ok(data.lookup == "known")
                },
            ),
        ),
        Command::Recipients(RecipientsCommand::Stats { common }) => {
            let data: RecipientStats = change(&common, Request::RecipientsStats)?;
            print_value(&common, &data)
        }
        Command::Recipients(RecipientsCommand::Refresh { force, common }) => {
            let data: RefreshReport = change(&common, Request::RecipientsRefresh { force })?;
            print_value(&common, &data)
        }
        Command::Stats { common } => {
            let data = read(&common, Request::Stats, |pins| {
                let counters = pins.counters()?;
                Ok(Stats {
                    kernel_status: pins.describe(),
                    kernel: Some(
                        counters
                            .fields()
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), *v))
                            .collect(),
                    ),
                    // Only the agent knows these.
                    proxy: None,
                    recipients: None,
                    filters: None,
                    cluster: None,
                })
            })?;
            print_value(&common, &data)
        }
        Command::Top {
            once,
            interval,
            common,
        } => loop {
            let data: Top = change(&common, Request::Top)?;
            if !once && !common.json {
                // Clear the screen and go home: the frame refreshes in place.
                print!("\x1b[2J\x1b[H");
            }
            print_top(&common, &data)?;
            let _ = std::io::stdout().flush();
            if once || common.json {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(interval.max(1)));
        },
        Command::Reload { common } => {
            let data: Reloaded = change(&common, Request::Reload)?;
            if common.json {
                println!("{}", json_value(&data)?);
                return Ok(());
            }
            println!("reloaded {}", data.reloaded);
            if !data.restart_needed.is_empty() {
                println!(
                    "changed but in force only after a restart (systemctl restart smtp-limiter): {}",
                    data.restart_needed.join(", ")
                );
            }
            Ok(())
        }
    }
}

/// Logs to stderr at `level` (`state.log_level`) unless `RUST_LOG` says
/// otherwise. Colours only on a terminal and without `NO_COLOR`; under
/// journald no timestamps (it adds its own) and a `<N>` priority prefix on
/// each line, so that `journalctl -p warning` works.
fn init_logging(json: bool, level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("RUST_LOG={directives:?} is not a valid log filter (e.g. \"debug\" or \"info,limiter_user::proxy=debug\")"))?,
        _ => EnvFilter::try_new(level)
            .with_context(|| format!("state.log_level = {level:?}"))?,
    };
    let journal = stderr_is_journal();
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = !journal && !no_color && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match (json, journal) {
        (true, false) => builder.json().init(),
        (true, true) => builder
            .event_format(SyslogPriority(tracing_subscriber::fmt::format().json()))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .init(),
        (false, false) => builder.init(),
        (false, true) => builder
            .event_format(SyslogPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init(),
    }
    Ok(())
}

/// Whether stderr is connected to journald: systemd sets `JOURNAL_STREAM`
/// to the `device:inode` of the stream it gives the service.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on a descriptor number only fills the struct it is given.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &raw mut stat) } != 0 {
        return false;
    }
    stat.st_dev == dev && stat.st_ino == ino
}

/// Puts the syslog priority in front of each line (`<3>` error … `<7>`
/// debug), which journald reads and strips (`SyslogLevelPrefix=`).
struct SyslogPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for SyslogPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

fn load_config(common: &Common) -> anyhow::Result<Config> {
    load_config_from(common).map(|(_, config)| config)
}

/// The configuration `--config` names, else the one at
/// [`DEFAULT_CONFIG_PATH`], with the path it was read from.
fn load_config_from(common: &Common) -> anyhow::Result<(PathBuf, Config)> {
    if let Some(path) = &common.config {
        return Ok((path.clone(), Config::load(path)?));
    }
    let path = PathBuf::from(DEFAULT_CONFIG_PATH);
    if !path.exists() {
        bail!(
            "no configuration file at {DEFAULT_CONFIG_PATH} (the default path): install the \
             smtp-limiter package (it ships one), copy the commented reference \
             config/smtp-limiter.toml there (set backend.builtin = false and backend.address \
             to your MTA), or name a file with --config FILE"
        );
    }
    let config = Config::load(&path)?;
    Ok((path, config))
}

/// A request that needs the running agent; its answer, read as `T` (the
/// request's answer type, [`control::Answer`]).
fn change<T: DeserializeOwned>(common: &Common, request: Request) -> anyhow::Result<T> {
    let config = load_config(common)?;
    match control::request(&config.control.socket, &request) {
        Ok(response) => data(response),
        Err(e @ ClientError::NotRunning { .. }) => {
            bail!("{e}; changes go through the running agent (so that they are enforced and stored): start it with `smtp-limiter run`")
        }
        Err(e) => Err(e.into()),
    }
}

/// The data of the agent's response, or its error.
fn data<T>(response: control::Response<T>) -> anyhow::Result<T> {
    if response.ok {
        response
            .data
            .context("the agent answered without data: is it another version?")
    } else {
        bail!(
            "{}",
            response.error.unwrap_or_else(|| "the agent refused".into())
        )
    }
}

/// A read: from the agent, or from the pinned maps when it is not running.
fn read<T: DeserializeOwned>(
    common: &Common,
    request: Request,
    from_pins: impl FnOnce(&BpfDatapath) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let config = load_config(common)?;
    match control::request(&config.control.socket, &request) {
        Ok(response) => data(response),
        Err(ClientError::NotRunning { .. }) => {
            eprintln!(
                "note: the agent is not running; reading the pinned kernel maps at {}",
                config.kernel.pin_path.display()
            );
            let pins = BpfDatapath::open_pinned(&config.kernel.pin_path).with_context(|| {
                format!(
                    "opening the kernel maps at {}",
                    config.kernel.pin_path.display()
                )
            })?;
            from_pins(&pins)
        }
        Err(e) => Err(e.into()),
    }
}

/// An answer as JSON with its keys sorted, as the CLI has always printed
/// them (scripts may compare the text).
fn json_value(data: &impl Serialize) -> anyhow::Result<Value> {
    serde_json::to_value(data).context("writing the answer as JSON")
}

/// Prints an answer as JSON with `--json`, else as a tree of `key: value`
/// lines.
fn print_value(common: &Common, data: &impl Serialize) -> anyhow::Result<()> {
    let data = json_value(data)?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
    } else {
        print_tree(&data, 0);
    }
    Ok(())
}

/// Prints nested JSON as indented `key: value` lines.
fn print_tree(value: &Value, depth: usize) {
    let pad = "  ".repeat(depth);
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                if value.is_object() || value.is_array() {
                    println!("{pad}{key}:");
                    print_tree(value, depth + 1);
                } else {
                    println!("{pad}{key}: {}", scalar(value));
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(map) => {
                        let line: Vec<String> = map
                            .iter()
                            .map(|(k, v)| format!("{k}={}", scalar(v)))
                            .collect();
                        println!("{pad}- {}", line.join(" "));
                    }
                    other => println!("{pad}- {}", scalar(other)),
                }
            }
        }
        other => println!("{pad}{}", scalar(other)),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn parse_format(text: &str) -> Result<Format, String> {
    text.parse()
}

/// The origin and free-text reason of `block add` (and the defaults of
/// `block import`): `--origin` must be one of ours; a `--reason` that is an
/// origin name sets the origin, as it did before reasons were free text.
fn add_origin(
    origin: Option<&str>,
    reason: Option<&str>,
) -> anyhow::Result<(String, Option<String>)> {
    if let Some(origin) = origin {
        parse_origin(origin).map_err(anyhow::Error::msg)?;
    }
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    let (code, comment) = exchange::origin_and_reason(origin, reason);
    let origin = code.unwrap_or(Reason::Manual).name().to_owned();
    if let Some(comment) = &comment {
        commands::clean_comment(comment).map_err(anyhow::Error::msg)?;
    }
    Ok((origin, comment))
}

/// Ends a command that answers a question: exit status 0 for yes, 1 for
/// no (the answer is printed), 2 for an error (said on stderr).
fn answer(result: anyhow::Result<bool>) -> anyhow::Result<()> {
    let _ = std::io::stdout().flush();
    match result {
        Ok(true) => Ok(()),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("smtp-limiter: {e:#}");
            std::process::exit(2)
        }
    }
}

/// `block check`: prints the verdict; whether the address is dropped.
fn block_check(common: &Common, address: String) -> anyhow::Result<bool> {
    let ip: std::net::IpAddr = address
        .trim()
        .parse()
        .with_context(|| format!("{address:?} is not an IPv4 or IPv6 address"))?;
    let data = read(common, Request::BlockCheck { address }, |pins| {
        let ip = ip.to_canonical();
        let allowed = pins
            .allows()?
            .into_iter()
            .filter(|net| net.contains(&ip))
            .max_by_key(ipnet::IpNet::prefix_len);
        let hit = pins.block_covering(ip)?;
        let (dropped, verdict) = match (&allowed, &hit) {
            (Some(net), _) => (
                false,
                format!("not dropped: allow-listed by {net} (kernel allow map)"),
            ),
            (None, Some(hit)) => (
                true,
                format!(
                    "dropped: blocked in the kernel ({}), {}",
                    origin_name(hit.origin),
                    hit.expires.map_or("until removed".to_owned(), |t| format!(
                        "until {}",
                        humantime::format_rfc3339_seconds(t)
                    ))
                ),
            ),
            (None, None) => (
                false,
                "not dropped: no block in the kernel covers it".to_owned(),
            ),
        };
        Ok(BlockCheck {
            address: ip.to_string(),
            dropped,
            verdict,
            matches: Vec::new(),
        })
    })?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&json_value(&data)?)?);
    } else {
        println!("{}: {}", data.address, data.verdict);
        for m in &data.matches {
            let what = match m {
                Match::Block(row) => format!(
                    "block {} origin={} reason={:?} expires={} in_kernel={}",
                    row.net,
                    row.origin,
                    row.reason,
                    row.expires.as_deref().unwrap_or("never"),
                    row.in_kernel.map_or("null".to_owned(), |k| k.to_string())
                ),
                Match::List(row) => format!(
                    "reject-list {} ({})",
                    row.net,
                    row.list.as_deref().unwrap_or_default()
                ),
                Match::AllowList { net, list } => format!("allow-list {net} ({list})"),
                Match::Cap { source, reason, .. } => format!("cap {source}: {reason}"),
                Match::Kernel { .. } => format!("kernel {}", json_value(m)?),
            };
            println!("  {what}");
        }
    }
    Ok(data.dropped)
}

/// Calls `each` with every row `block list` would show, page by page
/// from the agent, or from the pinned maps when it is not running.
fn each_block_row(
    common: &Common,
    origin: Option<&str>,
    covering: Option<&str>,
    limit: Option<usize>,
    mut each: impl FnMut(&Entry) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if let Some(origin) = origin {
        parse_origin(origin).map_err(anyhow::Error::msg)?;
    }
    let covering_net = covering
        .map(|c| config::parse_cidr(c).map_err(|e| anyhow::anyhow!("--covering {c}: {e}")))
        .transpose()?;
    let config = load_config(common)?;
    let mut left = limit.unwrap_or(usize::MAX);
    let mut after = None;
    while left > 0 {
        let request = Request::BlockList {
            origin: origin.map(str::to_owned),
            covering: covering.map(str::to_owned),
            after: after.take(),
            rows: Some(left.min(commands::MAX_PAGE_ROWS)),
        };
        let page: BlockPage = match control::request(&config.control.socket, &request) {
            Ok(response) => data(response)?,
            Err(ClientError::NotRunning { .. }) => {
                eprintln!(
                    "note: the agent is not running; reading the pinned kernel maps at {} (no reasons, no reject-list sources)",
                    config.kernel.pin_path.display()
                );
                let pins =
                    BpfDatapath::open_pinned(&config.kernel.pin_path).with_context(|| {
                        format!(
                            "opening the kernel maps at {}",
                            config.kernel.pin_path.display()
                        )
                    })?;
                let mut blocks = pins.blocks()?;
                blocks.sort_by_key(|b| b.net);
                let now = SystemTime::now();
                for b in blocks
                    .iter()
                    .filter(|b| b.expires.is_none_or(|t| t > now))
                    .filter(|b| origin.is_none_or(|o| o == origin_name(b.origin)))
                    .filter(|b| covering_net.is_none_or(|c| b.net.contains(&c)))
                    .take(left)
                {
                    // The maps hold no reason text, start, repeat or list name.
                    let row = BlockRow {
                        net: b.net.to_string(),
                        origin: origin_name(b.origin).to_owned(),
                        reason: origin_name(b.origin).to_owned(),
                        comment: None,
                        list: None,
                        since: None,
                        expires: b
                            .expires
                            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                        repeat: None,
                        in_kernel: None,
                        drops: Some(Some(b.drops)),
                        node: None,
                    };
                    each(&if b.origin == Some(Reason::RejectList) {
                        Entry::List(row)
                    } else {
                        Entry::Block(row)
                    })?;
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        for row in page.blocks.iter().take(left) {
            each(row)?;
            left -= 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(())
}

fn block_list(
    common: &Common,
    origin: Option<String>,
    covering: Option<String>,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut rows = 0u64;
    if common.json {
        write!(out, "[")?;
    } else {
        writeln!(
            out,
            "{:<43} {:<12} {:<22} {:>8} REASON",
            "ADDRESS/NETWORK", "ORIGIN", "EXPIRES", "DROPS"
        )?;
    }
    each_block_row(
        common,
        origin.as_deref(),
        covering.as_deref(),
        limit,
        |entry| {
            if common.json {
                let row = json_value(entry)?;
                write!(out, "{}\n  {row}", if rows == 0 { "" } else { "," })?;
            } else {
                let row = entry.row();
                let mut reason = match (&row.list, &row.comment) {
                    (Some(list), _) => format!("list {list}"),
                    (None, Some(comment)) => comment.clone(),
                    (None, None) => String::new(),
                };
                // Decided by another edge host ([cluster]).
                if let Some(node) = &row.node {
                    reason = format!("{reason} (node {node})").trim_start().to_owned();
                }
                writeln!(
                    out,
                    "{:<43} {:<12} {:<22} {:>8} {reason}",
                    row.net,
                    row.origin,
                    row.expires.as_deref().unwrap_or("never"),
                    row.drops
                        .flatten()
                        .map_or("-".to_owned(), |d| d.to_string()),
                )?;
            }
            rows += 1;
            Ok(())
        },
    )?;
    if common.json {
        writeln!(out, "{}]", if rows == 0 { "" } else { "\n" })?;
    }
    out.flush()?;
    Ok(())
}

/// Reads a list from a file or standard input.
fn read_input(file: &std::path::Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if file == std::path::Path::new("-") {
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading standard input")?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    Ok(text)
}

fn block_import(
    common: &Common,
    file: &std::path::Path,
    format: Option<Format>,
    duration: Option<Duration>,
    origin: Option<String>,
    reason_text: Option<String>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let format = format.unwrap_or_else(|| {
        if file == std::path::Path::new("-") {
            Format::Plain
        } else {
            Format::of_path(file)
        }
    });
    let (default_origin, default_reason) = add_origin(origin.as_deref(), reason_text.as_deref())?;
    let now = SystemTime::now();
    let text = read_input(file)?;
    let parsed = exchange::parse(&text, format, now).map_err(|errors| {
        anyhow::anyhow!(
            "{}\nnothing imported: fix the lines above (format {format}; --format plain, csv or json)",
            limiter_user::lists::describe_errors(file, &errors)
        )
    })?;
    let now_unix = limiter_user::state::unix(now);
    let blocks: Vec<control::ImportBlock> = parsed
        .blocks
        .iter()
        .map(|b| control::ImportBlock {
            net: b.net.to_string(),
            origin: b
                .origin
                .map_or(default_origin.clone(), |c| c.name().to_owned()),
            comment: b.reason.clone().or_else(|| default_reason.clone()),
            expires_unix: match b.expires {
                Some(exchange::Expiry::At(at)) => Some(at),
                Some(exchange::Expiry::In(d)) => Some(now_unix.saturating_add(d.as_secs().max(1))),
                None => duration.map(|d| now_unix.saturating_add(d.as_secs())),
            },
            since_unix: b.since_unix,
        })
        .collect();
    for note in parsed.skipped.iter().take(10) {
        eprintln!("skipped {note}");
    }
    if parsed.skipped.len() > 10 {
        eprintln!("… and {} more skipped", parsed.skipped.len() - 10);
    }
    if dry_run {
        println!(
            "would import {} blocks from {} ({format}); {} skipped; nothing changed (--dry-run)",
            blocks.len(),
            file.display(),
            parsed.skipped.len()
        );
        return Ok(());
    }
    let config = load_config(common)?;
    let (mut added, mut not_in_kernel, mut expired) = (0, 0, 0);
    let mut errors: Vec<String> = Vec::new();
    // Batches that stay well under the control socket's request bound.
    let mut batch: Vec<control::ImportBlock> = Vec::new();
    let mut size = 0;
    let mut send = |batch: Vec<control::ImportBlock>| -> anyhow::Result<()> {
        let response: Imported = match control::request(&config.control.socket, &Request::BlockImport { blocks: batch }) {
            Ok(response) => data(response)?,
            Err(e @ ClientError::NotRunning { .. }) => bail!("{e}; blocks are imported through the running agent: start it with `smtp-limiter run`"),
            Err(e) => return Err(e.into()),
        };
        added += response.added;
        not_in_kernel += response.not_in_kernel;
        expired += response.expired;
        errors.extend(response.errors);
        Ok(())
    };
    for block in blocks {
        let len = serde_json::to_string(&block)?.len() + 1;
        if size + len > 48 * 1024 && !batch.is_empty() {
            send(std::mem::take(&mut batch))?;
            size = 0;
        }
        size += len;
        batch.push(block);
    }
    if !batch.is_empty() {
        send(batch)?;
    }
    for error in errors.iter().take(10) {
        eprintln!("refused: {error}");
    }
    println!(
        "imported {added} blocks from {} ({format}); {not_in_kernel} not in the kernel, {} skipped, {} refused",
        file.display(),
        parsed.skipped.len() as u64 + expired,
        errors.len()
    );
    if !errors.is_empty() {
        bail!("{} entries were refused by the agent", errors.len());
    }
    Ok(())
}

fn block_export(
    common: &Common,
    format: Format,
    origin: Option<String>,
    output: Option<PathBuf>,
) -> anyhow::Result<()> {
    let out: Box<dyn std::io::Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let now = SystemTime::now();
    let mut writer = exchange::Writer::new(out, format, now)?;
    let time = |t: &Option<String>| {
        t.as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    };
    each_block_row(common, origin.as_deref(), None, None, |entry| {
        let Entry::Block(row) = entry else {
            return Ok(());
        };
        let net = config::parse_cidr(&row.net).map_err(anyhow::Error::msg)?;
        writer.write(&exchange::Exported {
            net,
            origin: row.origin.clone(),
            reason: row.comment.clone(),
            expires: time(&row.expires),
            since: time(&row.since),
        })?;
        Ok(())
    })?;
    let written = writer.finish()?;
    if let Some(path) = output {
        eprintln!("exported {written} blocks to {} ({format})", path.display());
    }
    Ok(())
}

fn print_top(common: &Common, data: &Top) -> anyhow::Result<()> {
    if common.json {
        println!("{}", serde_json::to_string_pretty(&json_value(data)?)?);
        return Ok(());
    }
    println!(
        "smtp-limiter top — {}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    println!("\n{:<43} {:>11}", "SOURCE", "CONNECTIONS");
    for c in &data.connections {
        println!("{:<43} {:>11}", c.source, c.connections);
    }
    println!("\n{:<43} {:<12} {:>10}", "BLOCKED", "REASON", "DROPS");
    for b in &data.drops {
        println!("{:<43} {:<12} {:>10}", b.net, b.reason, b.drops);
    }
    println!("\n{:<30} {:>10}", "REFUSED BY THE PROXY", "COUNT");
    for r in &data.rejections {
        println!("{:<30} {:>10}", r.reason, r.count);
    }
    Ok(())
}
