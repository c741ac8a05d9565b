//! The documented TPNS wire format: return codes, TPNS-shaped error bodies, and the
//! `/v3/device/account/query` request and response (see `docs/tpns-api.md`). The parts the
//! simulator shares (codes, error bodies, paths, signatures) live in the `tpns-wire` crate.
//!
//! [`request`] parses what the client sends, [`answer`] checks what the upstream answers and
//! stitches the response; [`error`] holds the one mapping from the proxy's own errors to HTTP
//! status and `retCode`.

pub mod answer;
pub mod error;
pub mod rawobj;
pub mod request;

pub use tpns_wire::{code, error_body, ErrorShape, BATCHOPERATE_PATH, PUSH_APP_PATH, QUERY_PATH};
