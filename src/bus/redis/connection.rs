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

/// The scheme of a `CHANNELS_REDIS_URL` that names Sentinels.
pub const SENTINEL_SCHEME: &str = "redis+sentinel://";

/// `redis+sentinel://[user:password@]host:port[,host:port…]/master[/db]`:
/// the Sentinels to ask, the name of the master they watch, and the
/// credentials and database for that master (the Sentinels are asked
/// without credentials).
#[derive(Debug, PartialEq, Eq)]
pub struct SentinelUrl {
    pub sentinels: Vec<String>,
    pub master: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

impl SentinelUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let expected =
            "expected redis+sentinel://[user:password@]host:port[,host:port...]/master[/db]";
        let rest = url.strip_prefix(SENTINEL_SCHEME).ok_or(expected)?;
        let (authority, path) = rest.split_once('/').ok_or(expected)?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or(("", u))) {
            None => (None, None),
            Some((user, password)) => (
                (!user.is_empty()).then(|| user.to_string()),
                (!password.is_empty()).then(|| password.to_string()),
            ),
        };
        let sentinels: Vec<String> = hosts.split(',').map(str::trim).map(String::from).collect();
        if sentinels.iter().any(|h| {
            h.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            return Err(format!("each Sentinel is host:port ({expected})"));
        }
        let (master, db) = match path.split_once('/') {
            Some((master, db)) => (
                master,
                db.parse::<i64>()
                    .map_err(|_| format!("{db:?} is not a database number"))?,
            ),
            None => (path, 0),
        };
        if master.is_empty() {
            return Err(format!("no master name ({expected})"));
        }
        Ok(Self {
            sentinels,
            master: master.to_string(),
            username,
            password,
            db,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_master_and_its_credentials() {
        let url = SentinelUrl::parse(
            "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster/2",
        )
        .unwrap();
        assert_eq!(
            url,
            SentinelUrl {
                sentinels: vec!["10.0.0.1:26379".into(), "10.0.0.2:26379".into()],
                master: "mymaster".into(),
                username: Some("app".into()),
                password: Some("s3cret".into()),
                db: 2,
            }
        );
        let plain = SentinelUrl::parse("redis+sentinel://:pw@h:1/m").unwrap();
        assert_eq!(
            (plain.username, plain.password, plain.db),
            (None, Some("pw".into()), 0)
        );
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel://h/m",
            "redis+sentinel://h:1,:2/m",
            "redis+sentinel://h:1/m/x",
            "redis://h:1/m",
        ] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
