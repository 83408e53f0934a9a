//! A connection to a single Redis or to a Redis Cluster, and the one place
//! that tells the two apart: how to connect, subscribe, publish and run a
//! script on each.

use std::{convert::Infallible, time::Duration};

use redis::{
    AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, aio::MultiplexedConnection,
    cluster::ClusterClient, cluster_async::ClusterConnection,
};

use super::RedisSettings;

/// Connect and response timeout of every Redis call.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Handles what Redis pushes on a subscription connection.
pub type PushHandler = Box<dyn Fn(PushInfo) -> Result<(), Infallible> + Send + Sync>;

/// A single-Redis or a Redis Cluster connection. Cheap to clone: both
/// multiplex concurrent calls over their connections.
#[derive(Clone)]
pub enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Runs one command.
    pub async fn query<T: redis::FromRedisValue>(
        &mut self,
        command: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Connection::Single(c) => command.query_async(c).await,
            Connection::Cluster(c) => command.query_async(c).await,
        }
    }

    /// Runs a pipeline: its commands go out in order, in one write.
    pub async fn pipeline(
        &mut self,
        pipeline: &redis::Pipeline,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Connection::Single(c) => pipeline.query_async(c).await,
            Connection::Cluster(c) => pipeline.query_async(c).await,
        }
    }

    /// Runs a script (EVALSHA, loading it on NOSCRIPT).
    pub async fn invoke<T: redis::FromRedisValue>(
        &mut self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self {
            Connection::Single(c) => invocation.invoke_async(c).await,
            Connection::Cluster(c) => invocation.invoke_async(c).await,
        }
    }

    /// The publish command of this kind of Redis.
    pub fn publish_command(&self) -> &'static str {
        match self {
            Connection::Single(_) => "PUBLISH",
            Connection::Cluster(_) => "SPUBLISH",
        }
    }

    pub async fn subscribe(&mut self, topics: &[String]) -> redis::RedisResult<()> {
        match self {
            Connection::Single(c) => c.subscribe(topics).await,
            // Sharded channels of one SSUBSCRIBE must share a slot: one each.
            Connection::Cluster(c) => {
                for topic in topics {
                    c.ssubscribe(topic).await?;
                }
                Ok(())
            }
        }
    }

    pub async fn unsubscribe(&mut self, topics: &[String]) -> redis::RedisResult<()> {
        match self {
            Connection::Single(c) => c.unsubscribe(topics).await,
            Connection::Cluster(c) => {
                for topic in topics {
                    c.sunsubscribe(topic).await?;
                }
                Ok(())
            }
        }
    }
}

/// Opens connections, to a single Redis or to a Redis Cluster.
pub enum Connector {
    Single(Box<Client>),
    Cluster(Vec<String>),
}

impl Connector {
    pub fn new(settings: &RedisSettings) -> Result<Self, String> {
        if settings.cluster {
            ClusterClient::new(settings.urls.clone())
                .map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
            return Ok(Connector::Cluster(settings.urls.clone()));
        }
        let [url] = settings.urls.as_slice() else {
            return Err("CHANNELS_REDIS_URL: several URLs need CHANNELS_REDIS_CLUSTER=true".into());
        };
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
        let redis = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(redis))
            .map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
        Ok(Connector::Single(Box::new(client)))
    }

    /// A new connection; with `push`, a subscription connection whose pushes
    /// go to that handler.
    pub async fn connect(&self, push: Option<PushHandler>) -> redis::RedisResult<Connection> {
        match self {
            Connector::Single(client) => {
                let mut config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT));
                if let Some(push) = push {
                    config = config.set_push_sender(push);
                }
                Ok(Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Connector::Cluster(urls) => {
                let mut builder = ClusterClient::builder(urls.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(REDIS_TIMEOUT)
                    .response_timeout(REDIS_TIMEOUT);
                if let Some(push) = push {
                    builder = builder.push_sender(push);
                }
                Ok(Connection::Cluster(
                    builder.build()?.get_async_connection().await?,
                ))
            }
        }
    }
}
