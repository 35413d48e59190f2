//! The SMTP proxy: listeners, sessions relayed to the backend MTA, and the
//! client identity handed to it.

pub mod identity;
pub mod tls;
