//! The settings of the Redis bus: where Redis is and how it is named.

/// How to reach Redis. Its `Debug` masks passwords in the URLs.
#[derive(Clone)]
pub struct RedisSettings {
    /// `CHANNELS_REDIS_URL`: one `redis://` / `rediss://` URL, or, for a
    /// cluster, several comma-separated seed nodes.
    pub urls: Vec<String>,
    /// `CHANNELS_REDIS_CLUSTER`: use sharded pub/sub on a Redis Cluster.
    pub cluster: bool,
    /// `CHANNELS_REDIS_PREFIX`: prefix of every topic name.
    pub prefix: String,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| super::settings::mask_url(u))
            .collect();
        f.debug_struct("RedisSettings")
            .field("urls", &urls)
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .finish()
    }
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
