//! The `tpns-cache` binary: CLI -> config -> tracing -> run -> exit code.
//! Exit codes: 0 clean shutdown (or a valid configuration for `check-config`), 1 runtime
//! failure (e.g. a port in use), 2 invalid configuration or arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's allocator: the hit path allocates and frees small buffers on
/// every request (see BENCHMARKS.md, "Varied batches"), and under glibc that was ~14% of the
/// server's time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    #[command(flatten)]
    config: ConfigArg,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug, Default)]
struct ConfigArg {
    /// TOML configuration file (also TPNS_CACHE_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Serve(ConfigArg),
    /// Check a configuration exactly as `serve` would load it (file, environment variables,
    /// secrets), without starting anything; exit 0 when valid, 2 with every problem named.
    CheckConfig {
        /// The TOML file to check (defaults < FILE < TPNS_CACHE_* environment variables).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// On success, print the effective settings a deployment must agree with (listeners,
        /// shutdown grace, admin token, fleet mode) as one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Run the simulator and the proxy in front of it, and print curl commands to try.
    ///
    /// The simulator listens on an ephemeral loopback port; the proxy and admin listeners use
    /// the configuration (`listen`, `admin_listen`). `upstream.url` is ignored.
    #[cfg(feature = "demo")]
    Demo(ConfigArg),
    /// Run the TPNS simulator alone (for tests, benchmarks and local development).
    #[cfg(feature = "demo")]
    Simulate(tpns_cache::simulate::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(ConfigArg::default()));
    // `--config` may come before the subcommand or after it.
    let config_file = |own: ConfigArg| own.config.or(cli.config.config.clone());
    match command {
        Command::CheckConfig { file, json } => {
            match tpns_cache::load_config(file.or(cli.config.config.clone()).as_deref()) {
                Ok(config) if json => {
                    println!("{}", config.deployment_summary());
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    println!("tpns-cache: the configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tpns-cache: {e}");
                    ExitCode::from(2)
                }
            }
        }
        #[cfg(feature = "demo")]
        Command::Simulate(args) => {
            if cli.config.config.is_some() {
                eprintln!("tpns-cache: `simulate` takes no --config (its options are its own)");
                return ExitCode::from(2);
            }
            tpns_cache::logging::init_default();
            runtime().map_or(ExitCode::from(1), |rt| {
                rt.block_on(tpns_cache::simulate::run(
                    args,
                    tpns_cache::shutdown_signal(),
                ))
            })
        }
        Command::Serve(own) => start(config_file(own), false),
        #[cfg(feature = "demo")]
        Command::Demo(own) => start(config_file(own), true),
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("tpns-cache: cannot start the async runtime: {e}");
            None
        }
    }
}

/// Loads the configuration and runs the proxy (or the demo) until SIGINT/SIGTERM.
fn start(file: Option<PathBuf>, demo: bool) -> ExitCode {
    let config = match tpns_cache::load_config(file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tpns-cache: {e}");
            return ExitCode::from(2);
        }
    };
    tpns_cache::logging::init(&config.log);
    let Some(runtime) = runtime() else {
        return ExitCode::from(1);
    };
    let result: Result<(), String> = runtime.block_on(async {
        if demo {
            #[cfg(feature = "demo")]
            return tpns_cache::demo::run(config, tpns_cache::shutdown_signal())
                .await
                .map_err(|e| e.to_string());
        }
        let listeners = tpns_cache::Listeners::bind(&config)
            .await
            .map_err(|e| e.to_string())?;
        tpns_cache::run(config, listeners, tpns_cache::shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tpns-cache: {e}");
            ExitCode::from(1)
        }
    }
}
