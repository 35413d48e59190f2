//! Blocks: the one type every layer passes around (the policy's orders
//! once applied, operators' commands, imports, the cluster, the state store,
//! listings), with its origin as [`Reason`], and the agent's table of the
//! active ones ([`Blocks`]).
//!
//! The kernel keeps a narrower copy (network, origin code, expiry, drop
//! count: `limiter_common::Block`); the state file, the control socket and
//! the cluster's wire each have a serialized form, converted from and to
//! [`Block`] where they are read and written.

mod table;

use std::{sync::Arc, time::SystemTime};

use ipnet::IpNet;
pub use limiter_common::Reason;

pub use table::{expiry_key, BlockCounts, Blocks, Cursor, Page, NEVER};

/// An active block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub net: IpNet,
    /// Who or what ordered it (manual, harvest, auth…): the
    /// machine-readable field.
    pub origin: Reason,
    /// `None` = until removed.
    pub expires: Option<SystemTime>,
    /// When the block began.
    pub since: SystemTime,
    /// Earlier blocks of this source (0 for a first block).
    pub repeat: u32,
    /// Free text beside the origin: an operator's `--reason "ticket 4711"`,
    /// an imported list's reason. Shared, so listing copies no text.
    pub comment: Option<Arc<str>>,
}

/// A change of the table, for the state store's journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A block added or replaced.
    Put(Block),
    /// A block removed by an operator (expired and evicted blocks are not
    /// journaled: a restore drops the expired ones and evicts again).
    Remove(IpNet),
}

/// The name of an origin read from outside (the kernel's maps, a file),
/// whose code may be one this version does not know.
#[must_use]
pub fn origin_name(origin: Option<Reason>) -> &'static str {
    origin.map_or("unknown", Reason::name)
}

/// The origin named `name`, as an operator writes it (`block add
/// --origin`, `block list --origin`, an import).
///
/// # Errors
/// An unknown name, with the valid ones.
pub fn parse_origin(name: &str) -> Result<Reason, String> {
    Reason::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
        format!("unknown origin {name:?}: use one of {}", known.join(", "))
    })
}
