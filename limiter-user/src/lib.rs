//! smtp-limiter: an edge guard for mail servers.
//!
//! The agent's modules follow the data flow:
//!
//! * [`config`] — the TOML configuration: parsing, defaults, validation, and
//!   the embedded reference configuration.
//! * [`kernel`] — the one door to the kernel programs (`limiter-ebpf`): load,
//!   attach, pin, and the [`kernel::Datapath`] interface the rest of the
//!   agent uses to block, allow, cap and read counts.
//! * [`smtp`] — SMTP parsing: lines, commands, replies, EHLO filtering, DATA
//!   scanning (pure, no I/O).
//! * [`policy`] — the decisions: caps, lists, harvest, AUTH, null-sender
//!   rates, relay patterns, block durations (pure; state behind guards).
//! * [`proxy`] — listeners and sessions relayed to the backend MTA.
//! * [`filters`] — rspamd and ClamAV asked about each message before the
//!   backend accepts it.
//! * [`sink`] — the built-in test backend (`backend.builtin`).
//! * [`metrics`] — Prometheus exposition of the kernel and proxy counters.
//! * [`state`] — blocks stored on disk across restarts and reboots (a
//!   snapshot and a journal).
//! * [`lists`] — allow and reject lists by network, from the configuration
//!   and from list files; the plain list format.
//! * [`exchange`] — block lists in and out: plain, CSV and JSON
//!   (`block import`, `block export`).
//! * [`recipients`] — valid recipients from an LDAP directory (Active
//!   Directory included): the set in force, its refresh and its cache.
//! * [`control`] — the CLI's Unix socket; [`commands`] carries its requests
//!   out.
//! * [`agent`] — the running agent: brings the kernel layer up as configured,
//!   applies lists and caps, logs kernel drops, sweeps expired blocks.
pub mod agent;
pub mod blocks;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod control;
pub mod exchange;
pub mod filters;
pub mod kernel;
pub mod lists;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod recipients;
pub mod sink;
pub mod smtp;
pub mod state;
