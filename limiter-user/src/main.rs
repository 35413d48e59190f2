//! `smtp-limiter`: the agent and its command line. Commands other than `run`
//! and `check-config` talk to the running agent over its control socket;
//! when it is not running, `block list`, `allow list` and `stats` read the
//! pinned kernel maps directly (and say so), and changes are refused.

use std::{
    io::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use limiter_common::reason;
use limiter_user::{
    agent, commands,
    config::{self, Config},
    control::{self, ClientError, Request},
    kernel::{BpfDatapath, Datapath},
};
use serde_json::{json, Value};

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
    /// Configuration file (TOML); without it the embedded default is used.
    /// The CLI reads the control socket and pin path from it.
    #[arg(long, short, global = true)]
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
        /// Log as JSON lines.
        #[arg(long)]
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
    /// Example: smtp-limiter block add 198.51.100.7 --for 2h --reason manual
    Add {
        net: String,
        /// How long; without it the block lasts until removed.
        #[arg(long = "for", value_parser = config::parse_duration)]
        duration: Option<Duration>,
        /// manual, harvest, auth, flood, reject-list, relay or filter.
        #[arg(long, default_value = "manual")]
        reason: String,
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
    /// List blocks: address/network, reason, expiry, packets dropped.
    ///
    /// Example: smtp-limiter block list --json
    List {
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
    /// Whether an address is a known recipient.
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
    /// Names: max_connections_per_source, ipv6_prefix, max_failed_rcpt,
    /// max_failed_auth, failed_auth_window, null_sender_rate, block_duration,
    /// block_backoff, max_block_duration.
    ///
    /// Example: smtp-limiter limits set max_failed_rcpt 3
    Set {
        name: String,
        value: String,
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A CLI whose output goes into `head` should end quietly, not panic
        // on EPIPE (the agent keeps Rust's default: SIGPIPE ignored).
        // SAFETY: restoring the default disposition of a signal.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtp-limiter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            ebpf_object,
            json_logs,
            common,
        } => {
            init_logging(json_logs);
            let config = load_config(&common)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(agent::run(config, common.config.clone(), ebpf_object))
        }
        Command::CheckConfig { common } => {
            let loaded = load_config(&common)?;
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
            common,
        }) => {
            commands::reason_code(&reason).map_err(anyhow::Error::msg)?;
            let data = change(
                &common,
                Request::BlockAdd {
                    net,
                    duration_secs: duration.map(|d| d.as_secs()),
                    reason: reason.clone(),
                },
            )?;
            let net = data["net"].as_str().unwrap_or_default();
            match duration {
                Some(d) => println!(
                    "blocked {net} for {} ({reason}); kernel: {}",
                    humantime::format_duration(d),
                    data["kernel"].as_str().unwrap_or("?")
                ),
                None => println!(
                    "blocked {net} until removed ({reason}); kernel: {}",
                    data["kernel"].as_str().unwrap_or("?")
                ),
            }
            Ok(())
        }
        Command::Block(BlockCommand::Del { net, common }) => {
            let data = change(&common, Request::BlockDel { net })?;
            println!("unblocked {}", data["net"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Block(BlockCommand::List { common }) => {
            let data = read(&common, Request::BlockList, |pins| {
                let mut blocks = pins.blocks()?;
                blocks.sort_by_key(|b| b.net);
                Ok(json!(blocks
                    .iter()
                    .map(|b| json!({
                        "net": b.net.to_string(),
                        "reason": reason::name(b.reason),
                        "expires": b.expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                        "drops": b.drops,
                    }))
                    .collect::<Vec<_>>()))
            })?;
            print_blocks(&common, &data);
            Ok(())
        }
        Command::Allow(AllowCommand::Add { net, common }) => {
            let data = change(&common, Request::AllowAdd { net })?;
            println!(
                "allowed {} (live; add it to lists.allow to keep it)",
                data["net"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Command::Allow(AllowCommand::Del { net, common }) => {
            let data = change(&common, Request::AllowDel { net })?;
            println!(
                "removed {} from the allow list (live)",
                data["net"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Command::Allow(AllowCommand::List { common }) => {
            let data = read(&common, Request::AllowList, |pins| {
                Ok(json!(pins
                    .allows()?
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()))
            })?;
            if common.json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                data.as_array()
                    .into_iter()
                    .flatten()
                    .for_each(|n| println!("{}", n.as_str().unwrap_or_default()));
            }
            Ok(())
        }
        Command::Limits(LimitsCommand::Show { common }) => {
            let data = change(&common, Request::LimitsShow)?;
            print_value(&common, &data);
            Ok(())
        }
        Command::Limits(LimitsCommand::Set {
            name,
            value,
            common,
        }) => {
            let data = change(&common, Request::LimitsSet { name, value })?;
            println!(
                "{} = {}: in force now, in the kernel and the proxy. Not persisted: {}",
                data["name"].as_str().unwrap_or_default(),
                data["value"].as_str().unwrap_or_default(),
                data["note"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Command::Recipients(RecipientsCommand::Check { address, common }) => {
            let data = change(&common, Request::RecipientsCheck { address })?;
            print_value(&common, &data);
            Ok(())
        }
        Command::Recipients(RecipientsCommand::Stats { common }) => {
            let data = change(&common, Request::RecipientsStats)?;
            print_value(&common, &data);
            Ok(())
        }
        Command::Recipients(RecipientsCommand::Refresh { force, common }) => {
            let data = change(&common, Request::RecipientsRefresh { force })?;
            print_value(&common, &data);
            Ok(())
        }
        Command::Stats { common } => {
            let data = read(&common, Request::Stats, |pins| {
                let counters = pins.counters()?;
                Ok(json!({
                    "kernel_status": pins.describe(),
                    "kernel": counters.fields().iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "proxy": null,
                }))
            })?;
            print_value(&common, &data);
            Ok(())
        }
        Command::Top {
            once,
            interval,
            common,
        } => loop {
            let data = change(&common, Request::Top)?;
            if !once && !common.json {
                // Clear the screen and go home: the frame refreshes in place.
                print!("\x1b[2J\x1b[H");
            }
            print_top(&common, &data);
            let _ = std::io::stdout().flush();
            if once || common.json {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(interval.max(1)));
        },
        Command::Reload { common } => {
            let data = change(&common, Request::Reload)?;
            println!("reloaded {}", data["reloaded"].as_str().unwrap_or_default());
            Ok(())
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_config(common: &Common) -> anyhow::Result<Config> {
    match &common.config {
        Some(path) => Ok(Config::load(path)?),
        None => Ok(Config::from_toml(config::DEFAULT_CONFIG)
            .context("the embedded default configuration")?),
    }
}

/// A request that needs the running agent.
fn change(common: &Common, request: Request) -> anyhow::Result<Value> {
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
fn data(response: control::Response) -> anyhow::Result<Value> {
    if response.ok {
        Ok(response.data.unwrap_or(Value::Null))
    } else {
        bail!(
            "{}",
            response.error.unwrap_or_else(|| "the agent refused".into())
        )
    }
}

/// A read: from the agent, or from the pinned maps when it is not running.
fn read(
    common: &Common,
    request: Request,
    from_pins: impl FnOnce(&BpfDatapath) -> anyhow::Result<Value>,
) -> anyhow::Result<Value> {
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

fn print_value(common: &Common, data: &Value) {
    if common.json {
        println!("{}", serde_json::to_string_pretty(data).unwrap_or_default());
        return;
    }
    print_tree(data, 0);
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

fn print_blocks(common: &Common, data: &Value) {
    if common.json {
        println!("{}", serde_json::to_string_pretty(data).unwrap_or_default());
        return;
    }
    println!(
        "{:<43} {:<12} {:<22} {:>10}",
        "ADDRESS/NETWORK", "REASON", "EXPIRES", "DROPS"
    );
    for b in data.as_array().into_iter().flatten() {
        let expires = b["expires"].as_str().unwrap_or("never");
        let drops = b["drops"]
            .as_u64()
            .map_or("-".to_owned(), |d| d.to_string());
        println!(
            "{:<43} {:<12} {:<22} {:>10}",
            b["net"].as_str().unwrap_or_default(),
            b["reason"].as_str().unwrap_or_default(),
            expires,
            drops
        );
    }
}

fn print_top(common: &Common, data: &Value) {
    if common.json {
        println!("{}", serde_json::to_string_pretty(data).unwrap_or_default());
        return;
    }
    println!(
        "smtp-limiter top — {}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    println!("\n{:<43} {:>11}", "SOURCE", "CONNECTIONS");
    for c in data["connections"].as_array().into_iter().flatten() {
        println!(
            "{:<43} {:>11}",
            c["source"].as_str().unwrap_or_default(),
            scalar(&c["connections"])
        );
    }
    println!("\n{:<43} {:<12} {:>10}", "BLOCKED", "REASON", "DROPS");
    for b in data["drops"].as_array().into_iter().flatten() {
        println!(
            "{:<43} {:<12} {:>10}",
            b["net"].as_str().unwrap_or_default(),
            b["reason"].as_str().unwrap_or_default(),
            scalar(&b["drops"])
        );
    }
    println!("\n{:<30} {:>10}", "REFUSED BY THE PROXY", "COUNT");
    for r in data["rejections"].as_array().into_iter().flatten() {
        println!(
            "{:<30} {:>10}",
            r["reason"].as_str().unwrap_or_default(),
            scalar(&r["count"])
        );
    }
}
