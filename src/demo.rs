//! `tpns-cache demo`: the simulator (seed examples + generated bindings) on an ephemeral
//! loopback port, the proxy in front of it on the configured listeners, and ready-to-paste
//! `curl` commands that show a miss, a hit and a partial hit.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::Listeners;
use tpns_sim::{SimConfig, Simulator, DEMO_ACCESS_ID, DEMO_SECRET_KEY};

/// Generated bindings the demo simulator starts with (besides the seed's examples).
pub const DEMO_ACCOUNTS: usize = 10_000;
pub const DEMO_TOKENS: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Run(#[from] crate::RunError),
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = sim_listener.local_addr()?;
    let sim = Simulator::new(SimConfig {
        accounts: DEMO_ACCOUNTS,
        tokens: DEMO_TOKENS,
        ..SimConfig::default()
    });
    config.upstream.url = format!("http://{sim_addr}");
    config.upstream.region = None;
    let listeners = Listeners::bind(&config).await?;
    let proxy_addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sim_task = {
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            sim.serve(sim_listener, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await;
        })
    };
    println!("{}", instructions(proxy_addr, admin_addr, sim_addr));
    let mut rx = stop_rx;
    let result = crate::run(config, listeners, async move {
        tokio::select! {
            () = shutdown => {}
            _ = rx.wait_for(|stop| *stop) => {}
        }
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = sim_task.await;
    Ok(result?)
}

/// The demo's example queries: the seed's first example (a miss, then a hit) ...
pub const DEMO_FIRST: &str = r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1}]}"#;
/// ... the same two accounts and a new one (a partial hit) ...
pub const DEMO_PARTIAL: &str = r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1},{"account":"acct-00000042"}]}"#;
/// ... and the other direction, with an unregistered token.
pub const DEMO_TOKENS_QUERY: &str =
    r#"{"operator_type":2,"token_list":["token1","token2","tok-00000007","no-such-token"]}"#;

/// The text the demo prints.
pub fn instructions(proxy: SocketAddr, admin: SocketAddr, sim: SocketAddr) -> String {
    let q = |body: &str| {
        format!(
            "curl -si -u {DEMO_ACCESS_ID}:{DEMO_SECRET_KEY} -H 'Content-Type: application/json' \\\n    \
             http://{proxy}/v3/device/account/query -d '{body}'"
        )
    };
    let first = r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1}]}"#;
    let partial = r#"{"operator_type":1,"account_list":[{"account":"account1"},{"account":"account2","account_type":1},{"account":"acct-00000042"}]}"#;
    let tokens =
        r#"{"operator_type":2,"token_list":["token1","token2","tok-00000007","no-such-token"]}"#;
    format!(
        "tpns-cache demo is running.
  proxy      http://{proxy}   (point your app's TPNS base URL here)
  simulator  http://{sim}   (a TPNS stand-in; app {DEMO_ACCESS_ID}, {DEMO_ACCOUNTS} accounts, {DEMO_TOKENS} tokens + the seed's examples)
  status     http://{admin}/   (open it in a browser: hit ratio, what the upstream was spared, quota, cache)
  metrics    http://{admin}/metrics

Paste these in another terminal and watch the Cache-Status header:

# 1. miss: the first request of a credential goes upstream whole (Cache-Status: fwd=request)
{first_cmd}

# 2. hit: the same batch again is answered from the cache (Cache-Status: hit), no upstream call
{first_cmd}

# 3. partial hit: two cached accounts and one new one; only the new one goes upstream
#    (Cache-Status: fwd=partial; detail=\"hit 2/3\")
{partial_cmd}

# 4. the other direction: tokens to accounts (an unregistered token answers \"1008006\")
{tokens_cmd}

# what the upstream was spared, and what it received:
curl -s http://{admin}/metrics | grep -E '^tpns_cache_(lookups|upstream_identifiers)_total'
curl -s http://{sim}/_sim/stats

Stop with Ctrl-C.",
        first_cmd = q(first),
        partial_cmd = q(partial),
        tokens_cmd = q(tokens),
    )
}
