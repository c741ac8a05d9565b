//! Logs to stderr: `log.level` (a level, or `tracing` filter directives; `RUST_LOG` overrides
//! it) in `log.format` (`text` or `json`), with colours only when stderr is a terminal and
//! `NO_COLOR` is unset.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{parse_filter, LogConfig, LogFormat};

/// Installs the global subscriber for `log` (once per process).
pub fn init(log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| parse_filter(&v).ok())
        .or_else(|| parse_filter(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Text logs at `info` (the simulator's).
pub fn init_default() {
    init(&LogConfig {
        level: crate::config::DEFAULT_LOG_LEVEL.to_owned(),
        format: LogFormat::Text,
    });
}
