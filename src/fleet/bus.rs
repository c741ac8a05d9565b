//! The invalidation bus: every write or purge one sidecar sees is published on
//! `<prefix>:v1:invalidate`, and every other sidecar drops what it makes wrong from its own
//! cache. Subscribing reconnects by itself.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Link;

/// One invalidation, as published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Invalidation {
    /// The sidecar that published it.
    #[serde(rename = "o")]
    pub(crate) origin: u64,
    pub(crate) app: String,
    pub(crate) tokens: Vec<String>,
    pub(crate) accounts: Vec<String>,
    /// Every entry of the app (a purge of the whole app).
    pub(crate) all: bool,
    /// Whether the sender moved the app's generation in the shared tier. When it could not,
    /// every sidecar that hears of it fails closed for the app too (see
    /// [`crate::cache::shared`]).
    #[serde(rename = "b", default)]
    pub(crate) bumped: bool,
}

#[derive(Debug)]
pub(crate) struct Bus {
    link: Link,
    channel: String,
}

impl Bus {
    pub(crate) fn new(link: Link) -> Bus {
        Bus {
            channel: link.global("invalidate"),
            link,
        }
    }

    pub(crate) fn origin(&self) -> u64 {
        self.link.origin()
    }

    /// Publishes `msg`; whether Redis took it.
    pub(crate) async fn publish(&self, msg: &Invalidation) -> bool {
        let Ok(payload) = serde_json::to_string(msg) else {
            return false;
        };
        let published: Option<u64> = self
            .link
            .run(redis::cmd("PUBLISH").arg(&self.channel).arg(payload))
            .await;
        published.is_some()
    }

    /// Hands every other sidecar's invalidation to `apply`, until the process ends.
    pub(crate) fn subscribe<F, Fut>(&self, apply: F)
    where
        F: Fn(Invalidation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        // On a cluster a PUBLISH reaches every node, so one subscription to any seed node
        // hears the whole fleet; when it breaks, the next seed is tried.
        let clients = self.link.target().pubsub_clients();
        let channel = self.channel.clone();
        let own = self.link.origin();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            for client in clients.iter().cycle() {
                let pubsub = match client.get_async_pubsub().await {
                    Ok(mut p) => p.subscribe(&channel).await.ok().map(|()| p),
                    Err(_) => None,
                };
                let Some(mut pubsub) = pubsub else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let mut stream = pubsub.on_message();
                while let Some(msg) = stream.next().await {
                    match serde_json::from_slice::<Invalidation>(msg.get_payload_bytes()) {
                        Ok(m) if m.origin != own => apply(m).await,
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpns_sim::redis::RedisServer;

    #[tokio::test]
    async fn invalidations_reach_the_other_sidecars_only() {
        let redis = RedisServer::start();
        let link = || {
            let metrics =
                super::super::FleetMetrics::register(&prometheus::Registry::new()).expect("m");
            Link::start(
                super::super::Target::node(&redis.url()),
                Duration::from_millis(200),
                "t",
                "http://u",
                metrics,
            )
            .expect("link")
        };
        let (a, b) = (Bus::new(link()), Bus::new(link()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Invalidation)>();
        for (who, bus) in [(1u64, &a), (2, &b)] {
            let tx = tx.clone();
            bus.subscribe(move |m| {
                let _ = tx.send((who, m));
                async {}
            });
        }
        let msg = Invalidation {
            origin: a.origin(),
            app: "app".into(),
            tokens: vec!["t".into()],
            accounts: Vec::new(),
            all: false,
            bumped: true,
        };
        // Published until the subscriptions are in place (they connect in the background).
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let _ = a.publish(&msg).await;
                if let Ok(Some(got)) =
                    tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
                {
                    return got;
                }
            }
        })
        .await
        .expect("delivered");
        assert_eq!(got.0, 2, "only the other sidecar applies it");
        assert_eq!(got.1.app, "app");
        assert_eq!(got.1.tokens, ["t"]);
    }
}
