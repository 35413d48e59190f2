//! `[relay]`: open-relay protection.

use serde::{Deserialize, Serialize};

/// `[relay]`: open-relay protection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Relay {
    /// Accepted recipient patterns, separated by blanks
    /// (e.g. `"*@example.com postmaster@example.com"`); empty leaves every recipient
    /// to the backend.
    pub accept: String,
}

impl Relay {
    /// The patterns of `accept`, in order.
    #[must_use]
    pub fn patterns(&self) -> Vec<&str> {
        self.accept.split_whitespace().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::assert_unknown_field;

    #[test]
    fn relay_patterns_split_on_blanks() {
        let relay = Relay {
            accept: " *@example.com\tpostmaster@*  a?b@x ".to_owned(),
        };
        assert_eq!(relay.patterns(), ["*@example.com", "postmaster@*", "a?b@x"]);
        assert!(Relay::default().patterns().is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key() {
        assert_unknown_field(&[("[relay]\nrecipients = \"*\"", "recipients")]);
    }
}
