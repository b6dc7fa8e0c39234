//! How sync reaches Redis: one node or a Redis Cluster, plain or TLS
//! (`rediss://`, a CA file, an optional client certificate). Reads go to the
//! node of each service's slot (every key of a service shares its hash tag,
//! docs/redis-keys.md, so one MULTI reads them all); the subscription is on
//! one node, since a cluster delivers PUBLISH to every node's subscribers.

use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::time::Duration;

/// What the settings say about Redis (file contents read once, at start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisConn {
    /// One URL, or the seed nodes of a cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// PEM of the CA that signed the server's certificate (`rediss://`).
    pub ca: Option<Vec<u8>>,
    /// PEM of a client certificate and its key.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisConn {
    fn certs(&self) -> Option<redis::TlsCertificates> {
        (self.ca.is_some() || self.client_cert.is_some()).then(|| redis::TlsCertificates {
            client_tls: self.client_cert.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: self.ca.clone(),
        })
    }

    fn node_client(&self, url: &str) -> RedisResult<redis::Client> {
        match self.certs() {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
        }
    }

    /// The clients, or what is wrong with the URLs.
    pub fn clients(&self) -> RedisResult<RedisClients> {
        let data = if self.cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(self.urls.clone());
            if let Some(certs) = self.certs() {
                builder = builder.certs(certs);
            }
            Data::Cluster(builder.build()?)
        } else {
            Data::Single(self.node_client(&self.urls[0])?)
        };
        let nodes = self
            .urls
            .iter()
            .map(|u| self.node_client(u))
            .collect::<RedisResult<_>>()?;
        Ok(RedisClients { data, nodes })
    }
}

// One per process, made once: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Data {
    Single(redis::Client),
    Cluster(ClusterClient),
}

pub struct RedisClients {
    data: Data,
    /// A client per node given, for the subscription.
    nodes: Vec<redis::Client>,
}

impl RedisClients {
    /// A connection for reads (and the rare version raise).
    pub async fn connect(&self, connect: Duration, response: Duration) -> RedisResult<Conn> {
        match &self.data {
            Data::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response));
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Data::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(response);
                Ok(Conn::Cluster(
                    client.get_async_connection_with_config(config).await?,
                ))
            }
        }
    }

    /// The subscription, on the `attempt`-th node (round robin, so a dead
    /// node given first does not stop sync from following changes).
    pub async fn pubsub(&self, attempt: usize) -> RedisResult<PubSub> {
        self.nodes[attempt % self.nodes.len()]
            .get_async_pubsub()
            .await
    }
}

/// A connection to one node or to the cluster.
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
