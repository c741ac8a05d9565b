//! Where the fleet's Redis is and how to reach it: one server (`redis://`, `rediss://`) or a
//! Redis Cluster (`redis.cluster`, seed nodes in `redis.url`), an ACL user with its password
//! from a file or an environment variable (never the TOML), and for `rediss://` the CA to trust
//! (`redis.ca_file`, instead of the web PKI roots).
//!
//! [`Conn`] hides which of the two it is from everything above: commands, pipelines and
//! scripts run the same way on both. On a cluster, every key of one app shares a hash slot
//! (see [`super::Link::key`]), so an app's generation and entries are read in one atomic MGET,
//! and a pipeline or script never spans two nodes.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use crate::config::{read_secret, RedisConfig};

/// The configured Redis, not connected yet.
#[derive(Clone)]
pub(crate) enum Target {
    Node(redis::Client),
    Cluster {
        client: redis::cluster::ClusterClient,
        /// One client per seed node: the invalidation bus subscribes through one of them
        /// (a PUBLISH reaches every node of a cluster).
        seeds: Vec<redis::Client>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Node(_) => "Target::Node",
            Target::Cluster { .. } => "Target::Cluster",
        })
    }
}

impl Target {
    /// Builds the client(s) from the configuration, reading the password and the CA file.
    /// Every problem names its key; nothing is connected.
    pub(crate) fn from_config(cfg: &RedisConfig) -> Result<Target, String> {
        let password = read_secret(
            "redis.password",
            cfg.password_file.as_deref(),
            cfg.password_env.as_deref(),
        )?;
        let ca = match &cfg.ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| format!("redis.ca_file: cannot read {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let urls: Vec<&str> = if cfg.cluster {
            cfg.url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect()
        } else {
            vec![cfg.url.as_str()]
        };
        if !cfg.cluster && cfg.url.contains(',') {
            return Err(
                "redis.url: one URL (a list of seed nodes needs redis.cluster = true)".into(),
            );
        }
        let mut infos = Vec::with_capacity(urls.len());
        for url in &urls {
            let mut info = url
                .into_connection_info()
                .map_err(|e| format!("redis.url: {e}"))?;
            if info.redis.password.is_some() {
                return Err("redis.url: the password does not belong in the URL; use \
                            redis.password_file or redis.password_env"
                    .into());
            }
            let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
            if ca.is_some() && !tls {
                return Err(format!(
                    "redis.ca_file: set, but {} is not a rediss:// URL",
                    redact(url)
                ));
            }
            if !cfg.username.is_empty() {
                info.redis.username = Some(cfg.username.clone());
            }
            if let Some(p) = &password {
                info.redis.password = Some(p.expose().to_owned());
            }
            infos.push(info);
        }
        if infos.is_empty() {
            return Err("redis.url: no seed node".into());
        }
        let node = |info: redis::ConnectionInfo| -> Result<redis::Client, String> {
            match &ca {
                Some(pem) => redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    },
                ),
                None => redis::Client::open(info),
            }
            .map_err(|e| format!("redis.url: {e}"))
        };
        if !cfg.cluster {
            return Ok(Target::Node(node(infos.remove(0))?));
        }
        let seeds = infos
            .iter()
            .cloned()
            .map(node)
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(std::time::Duration::from_secs(1))
            .response_timeout(cfg.timeout)
            .retries(1);
        if let Some(pem) = ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            });
        }
        let client = builder.build().map_err(|e| format!("redis.url: {e}"))?;
        Ok(Target::Cluster { client, seeds })
    }

    /// Connects (once; both kinds reconnect by themselves afterwards).
    pub(crate) async fn connect(&self, timeout: std::time::Duration) -> redis::RedisResult<Conn> {
        match self {
            Target::Node(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(std::time::Duration::from_secs(1))
                    .set_response_timeout(timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(1000);
                ConnectionManager::new_with_config(client.clone(), config)
                    .await
                    .map(Conn::Node)
            }
            Target::Cluster { client, .. } => {
                client.get_async_connection().await.map(Conn::Cluster)
            }
        }
    }

    /// Clients for a subscription, tried in order.
    pub(crate) fn pubsub_clients(&self) -> Vec<redis::Client> {
        match self {
            Target::Node(client) => vec![client.clone()],
            Target::Cluster { seeds, .. } => seeds.clone(),
        }
    }

    /// One server at `url`, for tests.
    #[cfg(test)]
    pub(crate) fn node(url: &str) -> Target {
        Target::Node(redis::Client::open(url).expect("a redis:// URL"))
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }
}

/// A URL for messages: scheme, host and port only.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{}", host.split('/').next().unwrap_or(""))
}

/// A connection to either kind of Redis.
#[derive(Clone)]
pub(crate) enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.to_owned(),
            ..crate::config::Config::default().redis
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_echoing_it() {
        let err = Target::from_config(&cfg("redis://:hunter2@127.0.0.1:6379")).unwrap_err();
        assert!(err.contains("redis.password_file"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn seed_lists_need_cluster_mode() {
        let err = Target::from_config(&cfg("redis://a:1,redis://b:2")).unwrap_err();
        assert!(err.contains("redis.cluster"), "{err}");
        let mut c = cfg("redis://127.0.0.1:1, redis://127.0.0.1:2");
        c.cluster = true;
        let t = Target::from_config(&c).expect("a cluster of two seeds");
        assert!(t.is_cluster());
        assert_eq!(t.pubsub_clients().len(), 2);
    }

    #[test]
    fn ca_file_needs_rediss_and_must_be_readable() {
        let mut c = cfg("redis://127.0.0.1:6379");
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let err = Target::from_config(&c).unwrap_err();
        assert!(err.starts_with("redis.ca_file: cannot read"), "{err}");
        let dir = std::env::temp_dir().join(format!("tpns-target-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        c.ca_file = Some(pem);
        let err = Target::from_config(&c).unwrap_err();
        assert!(err.contains("not a rediss:// URL"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_come_from_the_secret() {
        let mut c = cfg("redis://127.0.0.1:6379/0");
        c.username = "tpns".into();
        c.password_env = Some("TPNS_TEST_TARGET_NO_SUCH_VAR".into());
        let err = Target::from_config(&c).unwrap_err();
        assert!(err.contains("redis.password_env"), "{err}");
    }
}
