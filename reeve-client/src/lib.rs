//! The one client crate for callers of Reeve's gRPC services (the LLM gateway, the
//! bridge, the CLI):
//!
//! - [`ClientBuilder`] → [`Connection`]: address (`host:port` or URL, TLS for
//!   `https://`), service token (a [`secrecy::SecretString`], never printed), timeouts;
//!   the W3C trace context of the current span goes out on every call.
//! - [`CreditsClient`], [`QuotaClient`]: the generated clients behind one retry rule
//!   ([`retry`]): jittered backoff, only on UNAVAILABLE, DEADLINE_EXCEEDED and
//!   RESOURCE_EXHAUSTED, always the same request (the same idempotency key).
//! - [`BalanceReader`]: balance questions asked together, one `GetBalances` call per
//!   batch of waiting questions (`GetBalance` calls against a credits-svc without it).
//! - [`QuotaGuard`]: consume a feature's quota before metered work.
//! - [`Recorder`]: buffered, batched deductions and hold settles that are never lost
//!   or doubled, optionally kept in a write-ahead file ([`wal`]) across crashes.
//! - [`Meter`]: the metered call: hold → the caller's work → settle the reported cost
//!   through the recorder, or release on error or drop.

pub mod balances;
pub mod connect;
pub mod credits;
pub mod metered;
pub mod quota;
pub mod quota_guard;
pub mod recorder;
pub mod retry;
pub mod wal;

pub use balances::BalanceReader;
pub use connect::{ClientBuilder, ConnectError, Connection};
pub use credits::{CreditsClient, Refusal};
pub use metered::{HeldCredits, Meter, MeteredError, Reservation};
pub use quota::QuotaClient;
pub use quota_guard::{GuardError, Permit, QuotaGuard};
pub use recorder::{
    Charge, Deduction, ItemOutcome, Outcome, RecordError, Recorder, RecorderBuilder, RecorderError,
    RecorderStats, Settlement,
};
pub use retry::RetryPolicy;
pub use secrecy::SecretString;
