//! Mail as the private Postfix really stores it: a maildir per recipient,
//! so tests read the delivered message (its headers, its body) instead of
//! Postfix's log.
//!
//! [`Maildir::main_cf`] gives the settings to add to
//! [`PostfixOptions::extra_main_cf`] ([`Maildir::postfix_options`]): the
//! `virtual` delivery agent instead of `discard`, one maildir per
//! recipient (`alice@example.com` → `alice/`) under a directory of the
//! fixture's own, written as `nobody`. The recipients given are then the
//! valid ones (they replace the fixture's `virtual_mailbox_maps`). Each
//! delivery is still one `status=sent` line in Postfix's log.
//!
//! Messages are stored with LF line ends, after the headers Postfix adds
//! (`Return-Path`, `Delivered-To`, `Received`). The directory is removed
//! when the [`Maildir`] is dropped, unless `MAILDIR_FIXTURE_KEEP` is set.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{wait_until, write, InstanceDir, Server};
use crate::postfix::PostfixOptions;

/// The owner of the maildirs (`virtual_uid_maps`, `virtual_gid_maps`):
/// Debian's `nobody`/`nogroup`, above `virtual_minimum_uid` (100).
const OWNER: u32 = 65534;
static SERVER: Server = Server::new("maildir", "MAILDIR_FIXTURE_KEEP", |_, _| {});

/// Maildirs for some recipients, filled by a Postfix started with
/// [`Maildir::main_cf`].
pub struct Maildir {
    dir: InstanceDir,
    recipients: Vec<String>,
}

impl Maildir {
    /// A maildir base for `recipients` (full addresses in
    /// [`crate::postfix::DOMAIN`]).
    ///
    /// # Errors
    /// The directory or the map could not be written.
    pub fn new(recipients: &[&str]) -> Result<Maildir> {
        let dir = SERVER.new_dir()?;
        let mut map = String::new();
        for recipient in recipients {
            map.push_str(&format!("{recipient} {}/\n", mailbox(recipient)));
        }
        write(&dir.join("mailboxes"), &map)?;
        fs::create_dir(dir.join("mail")).context("creating the maildir base")?;
        std::os::unix::fs::chown(dir.join("mail"), Some(OWNER), Some(OWNER))
            .context("giving the maildir base to nobody")?;
        Ok(Maildir {
            dir,
            recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        })
    }

    /// `options` with [`Maildir::main_cf`] added.
    #[must_use]
    pub fn postfix_options(&self, mut options: PostfixOptions) -> PostfixOptions {
        options.extra_main_cf.extend(self.main_cf());
        options
    }

    /// The `main.cf` settings that deliver into these maildirs.
    #[must_use]
    pub fn main_cf(&self) -> Vec<(String, String)> {
        let d = self.dir.path().display();
        [
            ("virtual_transport", "virtual".to_owned()),
            ("virtual_mailbox_base", format!("{d}/mail")),
            ("virtual_mailbox_maps", format!("texthash:{d}/mailboxes")),
            ("virtual_uid_maps", format!("static:{OWNER}")),
            ("virtual_gid_maps", format!("static:{OWNER}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The messages stored for `recipient` (in `new/` and `cur/`), in the
    /// order of their file names (delivery time first).
    #[must_use]
    pub fn messages(&self, recipient: &str) -> Vec<Message> {
        let base = self.dir.join("mail").join(mailbox(recipient));
        let mut files: Vec<PathBuf> = ["new", "cur"]
            .iter()
            .filter_map(|sub| fs::read_dir(base.join(sub)).ok())
            .flat_map(|entries| entries.filter_map(|e| Some(e.ok()?.path())))
            .collect();
        files.sort_by_key(|p| p.file_name().map(ToOwned::to_owned));
        files
            .into_iter()
            .filter_map(|path| {
                Some(Message {
                    bytes: fs::read(&path).ok()?,
                    path,
                })
            })
            .collect()
    }

    /// Every message stored, for every recipient.
    #[must_use]
    pub fn all(&self) -> Vec<Message> {
        self.recipients
            .iter()
            .flat_map(|r| self.messages(r))
            .collect()
    }

    /// Waits until at least `n` messages are stored in all; whether they
    /// were within `timeout`. (That no more arrive is the caller's to
    /// show: e.g. every session ended at Postfix and its queue empty.)
    #[must_use]
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.all().len() >= n)
    }

    /// The base directory (`virtual_mailbox_base`).
    #[must_use]
    pub fn base(&self) -> PathBuf {
        self.dir.join("mail")
    }
}

/// The maildir (relative to the base) of `recipient`: its local part.
fn mailbox(recipient: &str) -> &str {
    recipient.split('@').next().unwrap_or(recipient)
}

/// One stored message.
#[derive(Clone)]
pub struct Message {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Message {
    /// The path and the text (its first 4 KiB): what a failing assertion
    /// should show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.text();
        let cut = text.char_indices().nth(4096).map_or(text.len(), |(i, _)| i);
        write!(f, "{}:\n{}", self.path.display(), &text[..cut])?;
        if cut < text.len() {
            write!(f, "[… {} more bytes]", text.len() - cut)?;
        }
        Ok(())
    }
}

impl Message {
    /// The message as text (lossy), LF line ends as stored.
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The header fields, in order: name as written, value unfolded
    /// (continuation lines joined with their leading blank kept), without
    /// the line end.
    #[must_use]
    pub fn headers(&self) -> Vec<(String, String)> {
        let text = self.text();
        let head = match text.find("\n\n") {
            Some(end) => &text[..end],
            None => &text[..],
        };
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in head.lines() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.1.push_str(line);
                }
                continue;
            }
            if let Some((name, value)) = line.split_once(':') {
                fields.push((name.to_owned(), value.trim_start().to_owned()));
            }
        }
        fields
    }

    /// The values of every header field named `name` (any case).
    #[must_use]
    pub fn header(&self, name: &str) -> Vec<String> {
        self.headers()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The body: what follows the blank line after the headers.
    #[must_use]
    pub fn body(&self) -> String {
        let text = self.text();
        text.split_once("\n\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}
