//! `smtp-limiter`: the agent and its command line.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use limiter_common::reason;
use limiter_user::{
    agent,
    config::{self, Config},
    kernel::{BpfDatapath, Datapath},
};

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

#[derive(Args)]
struct ConfigArg {
    /// Configuration file (TOML). Without it the embedded default is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    ///
    /// Example: smtp-limiter run --config /etc/smtp-limiter/smtp-limiter.toml
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Load the kernel object from this file instead of the embedded one.
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
    /// Validate a configuration and print the effective one.
    ///
    /// Example: smtp-limiter check-config --config /etc/smtp-limiter/smtp-limiter.toml
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Blocked addresses and networks (kernel drop).
    #[command(subcommand)]
    Block(BlockCommand),
    /// Allow-listed networks (never dropped, never capped).
    #[command(subcommand)]
    Allow(AllowCommand),
    /// Kernel counters and current connection counts.
    ///
    /// Example: smtp-limiter stats --json
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
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
        /// manual, harvest, auth, flood, reject-list, relay, filter.
        #[arg(long, default_value = "manual")]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a block.
    ///
    /// Example: smtp-limiter block del 198.51.100.7
    Del {
        net: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List blocks.
    ///
    /// Example: smtp-limiter block list --json
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum AllowCommand {
    /// Allow-list an address or network. Example: smtp-limiter allow add 10.0.0.0/8
    Add {
        net: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove an allow-list entry. Example: smtp-limiter allow del 10.0.0.0/8
    Del {
        net: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List allow-list entries. Example: smtp-limiter allow list --json
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            config,
            ebpf_object,
            json_logs,
        } => {
            init_logging(json_logs);
            let path = config.config.clone();
            let config = load_config(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(agent::run(config, path, ebpf_object))
        }
        Command::CheckConfig { config } => {
            let loaded = load_config(&config)?;
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
        Command::Block(command) => block(command),
        Command::Allow(command) => allow(command),
        Command::Stats { config, json } => stats(&open_pins(&config)?, json),
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

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    match &arg.config {
        Some(path) => Ok(Config::load(path)?),
        None => Ok(Config::from_toml(config::DEFAULT_CONFIG)
            .context("the embedded default configuration")?),
    }
}

/// The running (or last) agent's maps, read and written directly.
fn open_pins(arg: &ConfigArg) -> anyhow::Result<BpfDatapath> {
    let config = load_config(arg)?;
    let pin_path: &Path = &config.kernel.pin_path;
    BpfDatapath::open_pinned(pin_path)
        .with_context(|| format!("opening the kernel maps at {}", pin_path.display()))
}

fn parse_net(text: &str) -> anyhow::Result<IpNet> {
    config::parse_cidr(text).map_err(|e| anyhow::anyhow!("{text:?} is not an address or CIDR: {e}"))
}

fn reason_code(name: &str) -> anyhow::Result<u32> {
    (1..=16)
        .find(|code| reason::name(*code) == name)
        .with_context(|| format!("unknown reason {name:?}: use manual, harvest, auth, flood, reject-list, relay or filter"))
}

fn block(command: BlockCommand) -> anyhow::Result<()> {
    match command {
        BlockCommand::Add {
            net,
            duration,
            reason,
            config,
        } => {
            let net = parse_net(&net)?;
            let code = reason_code(&reason)?;
            let expires = duration.map(|d| SystemTime::now() + d);
            open_pins(&config)?.block(net, expires, code)?;
            match duration {
                Some(d) => println!(
                    "blocked {net} for {} ({reason})",
                    humantime::format_duration(d)
                ),
                None => println!("blocked {net} until removed ({reason})"),
            }
        }
        BlockCommand::Del { net, config } => {
            let net = parse_net(&net)?;
            if !open_pins(&config)?.unblock(net)? {
                bail!("{net} is not blocked");
            }
            println!("unblocked {net}");
        }
        BlockCommand::List { json, config } => {
            let mut blocks = open_pins(&config)?.blocks()?;
            blocks.sort_by_key(|b| b.net);
            if json {
                let list: Vec<_> = blocks
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "net": b.net.to_string(),
                            "reason": reason::name(b.reason),
                            "expires": b.expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                            "drops": b.drops,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<43} {:<12} {:<22} {:>10}",
                    "ADDRESS/NETWORK", "REASON", "EXPIRES", "DROPS"
                );
                for b in &blocks {
                    let expires = b.expires.map_or("never".to_owned(), |t| {
                        humantime::format_rfc3339_seconds(t).to_string()
                    });
                    println!(
                        "{:<43} {:<12} {:<22} {:>10}",
                        b.net.to_string(),
                        reason::name(b.reason),
                        expires,
                        b.drops
                    );
                }
            }
        }
    }
    Ok(())
}

fn allow(command: AllowCommand) -> anyhow::Result<()> {
    match command {
        AllowCommand::Add { net, config } => {
            let net = parse_net(&net)?;
            open_pins(&config)?.allow(net)?;
            println!("allowed {net}");
        }
        AllowCommand::Del { net, config } => {
            let net = parse_net(&net)?;
            if !open_pins(&config)?.disallow(net)? {
                bail!("{net} is not on the allow list");
            }
            println!("removed {net} from the allow list");
        }
        AllowCommand::List { json, config } => {
            let mut nets = open_pins(&config)?.allows()?;
            nets.sort();
            if json {
                let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                nets.iter().for_each(|n| println!("{n}"));
            }
        }
    }
    Ok(())
}

fn stats(datapath: &BpfDatapath, json: bool) -> anyhow::Result<()> {
    let counters = datapath.counters()?;
    let mut connections = datapath.connection_counts()?;
    connections.sort_by_key(|c| std::cmp::Reverse(c.1));
    if json {
        let kernel: serde_json::Map<String, serde_json::Value> = counters
            .fields()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        let conns: Vec<_> = connections
            .iter()
            .map(|(net, n)| serde_json::json!({"source": net.to_string(), "connections": n}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"kernel": kernel, "connections": conns})
            )?
        );
    } else {
        println!("kernel counters ({}):", datapath.describe());
        for (name, value) in counters.fields() {
            println!("  {name:<20} {value}");
        }
        println!("sources holding connections: {}", connections.len());
        for (net, n) in connections.iter().take(20) {
            println!("  {:<43} {n}", net.to_string());
        }
    }
    Ok(())
}
