//! `log.level`: what a valid value is.

use tracing_subscriber::EnvFilter;

/// The level names a directive may end in.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Parses a `log.level` value: comma-separated directives, each a level (`info`) or
/// `target=level` (`tpns_cache=debug,hyper=warn`, with `tracing`'s span and field filters).
/// Unlike `EnvFilter` on its own, a word that is not a level is refused rather than read as a
/// target, so a typo like `warning` cannot silently turn every log line off.
pub fn parse_filter(value: &str) -> Result<EnvFilter, String> {
    for directive in value.split(',').map(str::trim) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "{directive:?} is not a level ({}) or a target=level directive",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::try_new(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 14): `warning` or `verbose` started normally and printed nothing (the
    /// filter read the word as a target).
    #[test]
    fn levels_and_directives_are_accepted_and_anything_else_refused() {
        for ok in [
            "info",
            "WARN",
            "off",
            "tpns_cache=debug,hyper=warn",
            "info,tpns_cache::proxy=trace",
        ] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "warning",
            "verbose",
            "tpns_cache",
            "info,lots",
            "=",
            "x=loud",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
