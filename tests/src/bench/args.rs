//! The flags every benchmark understands. A benchmark flattens [`Common`]
//! into its own clap parser:
//!
//! ```ignore
//! #[derive(clap::Parser)]
//! struct Options {
//!     #[command(flatten)]
//!     common: Common,
//!     /// …its own flags
//! }
//! ```
//!
//! `cargo xtask bench -- --only NAME` takes the first `--only` to pick the
//! benchmark; a second one reaches the benchmark as [`Common::only`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

/// `--quick`, `--rounds N`, `--out DIR`, `--only LIST`, `--agent PATH`.
#[derive(Debug, Clone, Default, Args)]
pub struct Common {
    /// A short smoke run (each benchmark says what it shortens).
    #[arg(long)]
    pub quick: bool,
    /// Interleaved rounds, each measuring every setup once (default: the
    /// benchmark's own, smaller with --quick).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: Option<u32>,
    /// Where the report files go (JSON, SVG, CSV); default: the
    /// benchmark's own (docs/ for a full run, target/<bench>/ with --quick).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Run only these setups or parts, comma-separated (names in --help).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub only: Vec<String>,
    /// The smtp-limiter binary to run, for benchmarks that start the agent
    /// (default: target/release/smtp-limiter, which must be newer than the
    /// agent's sources; `cargo xtask build --release` builds it).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

impl Common {
    /// `--rounds`, or `full` (`quick` with `--quick`).
    #[must_use]
    pub fn rounds(&self, full: usize, quick: usize) -> usize {
        self.rounds
            .map_or(if self.quick { quick } else { full }, |r| r as usize)
    }

    /// `--out`, or `full` under the workspace (a full run's figures are
    /// kept), or `target/<name>` for a quick one.
    #[must_use]
    pub fn out_dir(&self, full: &str, name: &str) -> PathBuf {
        match &self.out {
            Some(dir) => dir.clone(),
            None if self.quick => workspace_root().join("target").join(name),
            None => workspace_root().join(full),
        }
    }

    /// The names in `--only` that are among `known`, in `known`'s order
    /// (all of them when `--only` is not given); an unknown name is an
    /// error that lists the known ones.
    ///
    /// # Errors
    /// A name in `--only` that `known` does not have.
    pub fn select<'a>(&self, known: &[&'a str]) -> Result<Vec<&'a str>> {
        if let Some(bad) = self.only.iter().find(|n| !known.contains(&n.as_str())) {
            bail!("--only {bad:?}: expected some of {}", known.join(", "));
        }
        Ok(known
            .iter()
            .copied()
            .filter(|k| self.only.is_empty() || self.only.iter().any(|n| n == k))
            .collect())
    }
}

/// The workspace's root directory (this crate's parent).
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: Common,
    }

    #[test]
    fn common_flags() {
        let cli = Cli::parse_from(["b", "--quick", "--rounds", "3", "--only", "a,c"]);
        assert!(cli.common.quick);
        assert_eq!(cli.common.rounds(5, 1), 3);
        assert_eq!(cli.common.select(&["a", "b", "c"]).unwrap(), ["a", "c"]);
        assert!(cli.common.select(&["a", "b"]).is_err());
        let cli = Cli::parse_from(["b", "--quick"]);
        assert_eq!(cli.common.rounds(5, 1), 1);
        assert_eq!(cli.common.select(&["a", "b"]).unwrap(), ["a", "b"]);
        assert!(Cli::try_parse_from(["b", "--rounds", "0"]).is_err());
    }
}
