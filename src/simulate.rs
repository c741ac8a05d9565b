//! `tpns-cache simulate`: the TPNS simulator (the `tpns-sim` crate) alone, for tests,
//! benchmarks and local development.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tpns_sim::{Faults, SimConfig, Simulator, DEMO_ACCESS_ID, DEMO_SECRET_KEY};

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Address to listen on (port 0: any free port, logged at start).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// An app the simulator accepts, as ACCESS_ID:SECRET_KEY (repeatable; default: the demo app).
    #[arg(long = "app", value_name = "ACCESS_ID:SECRET_KEY")]
    apps: Vec<String>,
    /// Generated accounts (token tok-i is bound to account acct-(i mod accounts)).
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Generated tokens.
    #[arg(long, default_value_t = 20_000)]
    tokens: usize,
    /// Do not load the seed document's example bindings.
    #[arg(long)]
    no_seed: bool,
    /// Latency added to every TPNS call, e.g. 20ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Share of calls answered HTTP 500 (0.0-1.0, every 1/ratio-th call).
    #[arg(long, default_value_t = 0.0)]
    fail_ratio: f64,
    /// Share of calls answered retCode 1008028 (frequency limit exceeded).
    #[arg(long, default_value_t = 0.0)]
    rate_limit_ratio: f64,
    /// Delay before a batchoperate takes effect, as TPNS applies binds asynchronously.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    apply_delay: Duration,
}

/// Runs the simulator until `shutdown` resolves. Exit code 2 for bad arguments, 1 when the
/// address cannot be bound.
pub async fn run(args: SimulateArgs, shutdown: impl Future<Output = ()>) -> ExitCode {
    let mut apps = Vec::new();
    for a in &args.apps {
        match a.split_once(':') {
            Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
                apps.push((id.to_owned(), secret.to_owned()));
            }
            _ => {
                eprintln!("tpns-cache: --app must be ACCESS_ID:SECRET_KEY, got {a:?}");
                return ExitCode::from(2);
            }
        }
    }
    if apps.is_empty() {
        apps.push((DEMO_ACCESS_ID.to_owned(), DEMO_SECRET_KEY.to_owned()));
    }
    for (name, r) in [
        ("--fail-ratio", args.fail_ratio),
        ("--rate-limit-ratio", args.rate_limit_ratio),
    ] {
        if !(0.0..=1.0).contains(&r) {
            eprintln!("tpns-cache: {name} must be between 0 and 1, got {r}");
            return ExitCode::from(2);
        }
    }
    let sim = Simulator::new(SimConfig {
        apps,
        faults: Faults {
            latency_ms: u64::try_from(args.latency.as_millis()).unwrap_or(u64::MAX),
            fail_ratio: args.fail_ratio,
            rate_limit_ratio: args.rate_limit_ratio,
            ..Faults::default()
        },
        apply_delay: args.apply_delay,
        accounts: args.accounts,
        tokens: args.tokens,
        seed_examples: !args.no_seed,
        ..SimConfig::default()
    });
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "tpns-cache: cannot listen on {} (--listen): {e}",
                args.listen
            );
            return ExitCode::from(1);
        }
    };
    let bound = listener
        .local_addr()
        .map_or_else(|_| args.listen.to_string(), |a| a.to_string());
    tracing::info!(listen = %bound, "TPNS simulator ready (stats at /_sim/stats)");
    sim.serve(listener, shutdown).await;
    ExitCode::SUCCESS
}
