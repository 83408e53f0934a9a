//! A connection to a single Redis (given, or found through Sentinel) or to
//! a Redis Cluster, and the one place that tells them apart: how to
//! connect, subscribe, publish and run a script on each.

use std::{convert::Infallible, time::Duration};

use redis::{
    AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, RedisConnectionInfo,
    aio::MultiplexedConnection,
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

use crate::config::{RedisSettings, SENTINEL_SCHEME, SentinelUrl};

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

/// The settings of a connection to a single Redis; with `push`, a
/// subscription connection whose pushes go to that handler.
fn single_config(push: Option<PushHandler>) -> AsyncConnectionConfig {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    match push {
        Some(push) => config.set_push_sender(push),
        None => config,
    }
}

/// Opens connections, to a single Redis or to a Redis Cluster.
pub enum Connector {
    Single(Box<Client>),
    /// A single Redis, the master that Sentinel names at each connect: after
    /// a failover, reconnecting reaches the new master.
    Sentinel(Box<tokio::sync::Mutex<SentinelClient>>),
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
        if url.starts_with(SENTINEL_SCHEME) {
            let url = SentinelUrl::parse(url).map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
            let mut master = RedisConnectionInfo::default()
                .set_db(url.db)
                .set_protocol(ProtocolVersion::RESP3);
            if let Some(username) = &url.username {
                master = master.set_username(username);
            }
            if let Some(password) = &url.password {
                master = master.set_password(password);
            }
            let sentinels: Vec<String> = url
                .sentinels
                .iter()
                .map(|host| format!("redis://{host}"))
                .collect();
            let client = SentinelClient::build(
                sentinels,
                url.master,
                Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(master)),
                SentinelServerType::Master,
            )
            .map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
            return Ok(Connector::Sentinel(Box::new(tokio::sync::Mutex::new(
                client,
            ))));
        }
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
            Connector::Single(client) => Ok(Connection::Single(
                client
                    .get_multiplexed_async_connection_with_config(&single_config(push))
                    .await?,
            )),
            Connector::Sentinel(sentinel) => {
                // Asks the Sentinels for the master, checks its ROLE, and
                // connects; bounded, as every Redis call is.
                let mut sentinel = sentinel.lock().await;
                let config = single_config(push);
                let connecting = sentinel.get_async_connection_with_config(&config);
                match tokio::time::timeout(REDIS_TIMEOUT * 2, connecting).await {
                    Ok(connection) => Ok(Connection::Single(connection?)),
                    Err(_) => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "no answer from the Sentinels or their master",
                    ))),
                }
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
