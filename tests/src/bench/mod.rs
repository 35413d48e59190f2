//! The benchmark harness: what the benchmark binaries (`src/bin/*-bench.rs`)
//! and their reports share, so that each binary holds only its own
//! measurement.
//!
//! * [`args`]: the flags every benchmark takes (`--quick`, `--rounds`,
//!   `--out`, `--only`, `--agent`), one clap parser flattened into each
//!   binary's own.
//! * [`agent`]: the real `smtp-limiter` binary with a generated
//!   configuration, in a network namespace or on the host; started, waited
//!   for (metrics, kernel up, greeting) and stopped cleanly.
//! * [`smtp_client`]: an SMTP client that binds the source address it is
//!   given (async for thousands of sessions, blocking for a few threads),
//!   with the time of each message.
//! * [`postfix`]: a private Postfix as the backend: listeners added (smtpd,
//!   postscreen), smtpd processes counted, and what its log says was
//!   delivered, so that every accepted message is checked delivered once.
//! * [`report`]: Markdown tables, the JSON file and an SVG line plot.
//! * [`system`]: the host's side: signals, limits (descriptors, ports,
//!   backlog, conntrack), CPU and memory of processes, helper processes that
//!   die with the benchmark.

pub mod agent;
pub mod args;
pub mod postfix;
pub mod report;
pub mod smtp_client;
pub mod system;
