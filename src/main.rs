//! The `tpns-cache` binary: CLI -> config -> tracing -> run -> exit code.
//! Exit codes: 0 clean shutdown, 1 runtime failure (e.g. a port in use), 2 invalid configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tpns_cache::config::{Config, LogFormat};
use tpns_cache::sim::{Faults, SimConfig, Simulator, DEMO_ACCESS_ID, DEMO_SECRET_KEY};

#[derive(Parser, Debug)]
#[command(
    name = "tpns-cache",
    version,
    about = "Caching reverse-proxy sidecar for TPNS's account/token binding query.",
    long_about = "Caching reverse-proxy sidecar for TPNS's POST /v3/device/account/query: \
                  splits each batch into per-identifier cache lookups, forwards only the misses \
                  upstream and stitches the documented response back. Every other TPNS path is \
                  forwarded unchanged.\n\nConfiguration: built-in defaults < TOML file \
                  (--config or TPNS_CACHE_CONFIG) < TPNS_CACHE_* environment variables \
                  (nesting with __, e.g. TPNS_CACHE_UPSTREAM__URL)."
)]
struct Cli {
    /// TOML configuration file (also TPNS_CACHE_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Serve,
    /// Run the simulator and the proxy in front of it, and print curl commands to try.
    ///
    /// The simulator listens on an ephemeral loopback port; the proxy and admin listeners use
    /// the configuration (`listen`, `admin_listen`). `upstream.url` is ignored.
    Demo,
    /// Run the TPNS simulator alone (for tests, benchmarks and local development).
    Simulate(SimulateArgs),
}

#[derive(Args, Debug)]
struct SimulateArgs {
    /// Address to listen on.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tpns-cache: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Simulate(args) => {
            init_tracing("info", LogFormat::Text);
            runtime.block_on(simulate(args))
        }
        command => {
            let config = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tpns-cache: {e}");
                    return ExitCode::from(2);
                }
            };
            init_tracing(&config.log.level, config.log.format);
            let result: Result<(), String> = runtime.block_on(async {
                match command {
                    Command::Demo => tpns_cache::demo::run(config, shutdown_signal())
                        .await
                        .map_err(|e| e.to_string()),
                    _ => serve(config).await,
                }
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tpns-cache: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let listeners = tpns_cache::Listeners::bind(&config)
        .await
        .map_err(|e| e.to_string())?;
    tpns_cache::run(config, listeners, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn simulate(args: SimulateArgs) -> ExitCode {
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
            eprintln!("tpns-cache: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    tracing::info!(listen = %args.listen, "TPNS simulator ready (stats at /_sim/stats)");
    sim.serve(listener, shutdown_signal()).await;
    ExitCode::SUCCESS
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
