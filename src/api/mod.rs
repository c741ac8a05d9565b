//! The documented TPNS wire format: return codes, TPNS-shaped error bodies, and the
//! `/v3/device/account/query` request and response (see `docs/tpns-api.md`). The parts the
//! simulator shares (codes, error bodies, paths, signatures) live in the `tpns-wire` crate.
//!
//! `error` holds the one mapping from proxy errors to HTTP status and `retCode`.

pub mod error;
pub mod query;
pub mod rawobj;

pub use tpns_wire::{code, error_body, ErrorShape, BATCHOPERATE_PATH, PUSH_APP_PATH, QUERY_PATH};
