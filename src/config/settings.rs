//! Every `CHANNELS_*` variable, declared once: its name, what applies when
//! it is unset, how it is read (the parser, with its bounds), how
//! `check-config` shows it, and its line of documentation.
//!
//! [`Config::from_vars`](super::Config::from_vars) reads through these
//! declarations, `check-config` shows what they read, the unknown-variable
//! check knows [`ALL`], and the README's configuration table is
//! [`markdown_table`] (a test keeps the two the same).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use axum::http::HeaderName;

use super::{LogFormat, Rate, Secret, SentinelUrl, dev, redis::SENTINEL_SCHEME};

/// One variable: everything about it but its type, which is [`Setting`]'s.
pub struct About {
    /// `CHANNELS_` and the declaration's name.
    pub name: &'static str,
    pub when_unset: WhenUnset,
    pub show: Show,
    /// The README's line, in Markdown.
    pub doc: &'static str,
    /// Whether a raw value reads (the parser, its value dropped), so that
    /// what is known of every variable is here.
    pub validate: fn(&str) -> Result<(), String>,
}

/// What a variable that is unset (or blank) means.
pub enum WhenUnset {
    /// This value, read as if it were set.
    Value(&'static str),
    /// One value in production (`None`: the variable is required) and
    /// another in dev mode.
    ByMode {
        production: Option<&'static str>,
        dev: &'static str,
    },
    /// No value: the feature is off or comes from elsewhere, as these words
    /// (the README's) say.
    Nothing(&'static str),
}

/// How `check-config` shows a value, so that no secret is ever printed.
pub enum Show {
    Plain,
    /// Its length only.
    Secret,
    /// A comma-separated list of secrets: their count and lengths.
    Secrets,
    /// URLs whose passwords are masked.
    Urls,
}

/// A variable read as a `T`.
pub struct Setting<T> {
    pub about: About,
    /// Reads a set value, bounds included; the error says why, without the
    /// variable's name (the caller adds it).
    pub parse: fn(&str) -> Result<T, String>,
}

impl<T> Setting<T> {
    pub const fn name(&self) -> &'static str {
        self.about.name
    }
}

impl About {
    /// The value that applies when the variable is unset, in this mode;
    /// `None` when there is none.
    pub fn unset_value(&self, dev_mode: bool) -> Option<&'static str> {
        match self.when_unset {
            WhenUnset::Value(value) => Some(value),
            WhenUnset::ByMode { dev, .. } if dev_mode => Some(dev),
            WhenUnset::ByMode { production, .. } => production,
            WhenUnset::Nothing(_) => None,
        }
    }

    /// Whether the variable must be set (outside dev mode).
    pub fn required(&self, dev_mode: bool) -> bool {
        matches!(
            self.when_unset,
            WhenUnset::ByMode {
                production: None,
                ..
            }
        ) && !dev_mode
    }

    /// `raw` as `check-config` prints it.
    pub fn shown(&self, raw: &str) -> String {
        match self.show {
            Show::Plain if raw.is_empty() => "(none)".into(),
            Show::Plain => raw.into(),
            Show::Secret => mask(raw),
            Show::Secrets => {
                let keys = split_list(raw);
                let masked: Vec<String> = keys.iter().map(|k| mask(k)).collect();
                format!("{} key(s), {}", keys.len(), masked.join(","))
            }
            Show::Urls => split_list(raw)
                .iter()
                .map(|url| mask_url(url))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The README's Default cell.
    fn default_cell(&self) -> String {
        let code = |value: &str| {
            if value.is_empty() {
                "none".to_string()
            } else {
                format!("`{value}`")
            }
        };
        match self.when_unset {
            WhenUnset::Value(value) => code(value),
            WhenUnset::ByMode {
                production: None, ..
            } => "**required**".into(),
            WhenUnset::ByMode {
                production: Some(production),
                dev,
            } => format!("{} (dev: {})", code(production), code(dev)),
            WhenUnset::Nothing(words) => words.into(),
        }
    }
}

/// A secret shown as its length only.
fn mask(secret: &str) -> String {
    format!("*** ({} bytes)", secret.len())
}

/// A URL with its password, if any, replaced by `***`.
pub fn mask_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The declarations, in the README's order: `NAME: Type = when unset,
/// show, parser, doc;` declares `pub const NAME: Setting<Type>` for the
/// variable `CHANNELS_NAME`, and lists it in [`ALL`].
macro_rules! settings {
    ($($id:ident: $ty:ty = $when_unset:expr, $show:ident, $parse:expr, $doc:expr;)*) => {
        $(
            pub const $id: Setting<$ty> = {
                const PARSE: fn(&str) -> Result<$ty, String> = $parse;
                Setting {
                    about: About {
                        name: concat!("CHANNELS_", stringify!($id)),
                        when_unset: $when_unset,
                        show: Show::$show,
                        doc: $doc,
                        validate: |raw| PARSE(raw).map(drop),
                    },
                    parse: PARSE,
                }
            };
        )*
        /// Every variable the node reads, in the README's order: a
        /// `CHANNELS_*` variable not in it is a misspelling.
        pub const ALL: &[&About] = &[$(&$id.about),*];
    };
}

use WhenUnset::{ByMode, Nothing, Value};

settings! {
    LISTEN: SocketAddr = ByMode { production: Some("0.0.0.0:3000"), dev: dev::LISTEN },
        Plain, listen_address,
        "Address of the HTTP and socket.io server: `host:port`, the host an IP address (IPv6 in \
         brackets), a name resolved at start (`localhost:3000`, IPv4 first) or empty for every \
         interface (`:3000`).";
    LISTEN_BACKLOG: u32 = Value("1024"), Plain, |raw| Ok(count(raw, 1, 65_535)? as u32),
        "Connections the kernel holds for the node before it accepts them, 1 to 65535; Linux \
         caps it at `net.core.somaxconn` (4096 by default since 5.4). A burst past it (reconnects \
         after a deploy, while the node is busy) has its SYNs dropped, and those clients wait \
         TCP's one-second retry (BENCHMARKS.md, \"The listen backlog\").";
    DEV: bool = Value("off"), Plain, parse_bool,
        "Dev mode, same as `serve --dev`: the secrets below get fixed, public values (API key \
         `dev-api-key`), CORS allows `*`. Never in production. Every boolean variable takes `1`, \
         `true`, `yes`, `on` and `0`, `false`, `no`, `off`.";
    AUTH_JWKS_URL: String = Nothing(""), Plain, jwks_url,
        "The identity provider's JWKS endpoint (e.g. \
         `https://kc/realms/R/protocol/openid-connect/certs`). RS256/384/512, PS256/384/512, \
         ES256, ES384.";
    AUTH_JWKS_FILE: PathBuf = Nothing(""), Plain, |raw| Ok(PathBuf::from(raw)),
        "The same, from a JWKS file on disk (read at start).";
    AUTH_HS256_SECRET: Secret = Nothing("none (dev: a fixed, public one)"), Secret, secret,
        "A shared HMAC secret for access tokens (tests, small setups); at least 32 bytes.";
    AUTH_ISSUER: Vec<String> = Nothing(""), Plain, non_empty_list,
        "Accepted `iss` values, comma-separated; when set, `iss` is required.";
    AUTH_AUDIENCE: Vec<String> = Nothing(""), Plain, non_empty_list,
        "Accepted `aud` values, comma-separated; when set, `aud` is required.";
    AUTH_LEEWAY: Duration = Value("30"), Plain, |raw| seconds(raw, 0, 3_600),
        "Seconds of clock skew tolerated on `exp` and `nbf` of access tokens, at most 3600.";
    WS_TOKEN_SECRET: Secret = ByMode { production: None, dev: dev::WS_TOKEN_SECRET },
        Secret, secret,
        "HMAC secret of the ws tokens, the same on every node; at least 32 bytes, and different \
         from `CHANNELS_AUTH_HS256_SECRET`.";
    WS_TOKEN_TTL: Duration = Value("300"), Plain, |raw| seconds(raw, 1, 86_400),
        "Lifetime of a ws token, in seconds (1 to 86400).";
    API_KEYS: Vec<Secret> = ByMode { production: None, dev: dev::API_KEY }, Secrets,
        |raw| Ok(non_empty_list(raw)?.into_iter().map(Secret::new).collect()),
        "Keys accepted by `/notify`, comma-separated; list old and new while rotating.";
    CORS_ORIGINS: Vec<String> = ByMode { production: Some(""), dev: "*" }, Plain,
        |raw| Ok(split_list(raw)),
        "Allowed browser origins, comma-separated, or `*`.";
    MAX_BODY_BYTES: usize = Value("1048576"), Plain, |raw| count(raw, 262_144, usize::MAX),
        "Largest `/notify` body; at least 262144 (256 KiB).";
    SOCKET_QUEUE: usize = Value("256"), Plain, |raw| count(raw, 8, usize::MAX),
        "Packets that may wait in one socket's send queue; a socket that overflows it is a slow \
         client, and its connection is closed (the client reconnects and recovers). At least 8.";
    SOCKET_QUEUE_BYTES: usize = Value("4194304"), Plain, |raw| count(raw, 65_536, usize::MAX),
        "Bytes of messages that may wait in one socket's send queue (4 MiB); past it too, the \
         socket is a slow client. A single larger message still goes into an empty queue. At \
         least 65536.";
    WS_MAX_MESSAGE_BYTES: usize = Value("16384"), Plain, |raw| count(raw, 1_024, usize::MAX),
        "Largest message (websocket) or request body (polling) a client may send, at least 1024; \
         clients only send a CONNECT with a token, and pongs.";
    HEADER_TIMEOUT: Duration = Value("10"), Plain, |raw| seconds(raw, 1, u64::MAX),
        "Seconds a connection has to send a complete request head, and a keep-alive connection \
         may stay idle between requests; also how long a socket.io session has to send its \
         CONNECT. The connection is closed past it.";
    PING_INTERVAL: Duration = Value("25"), Plain, |raw| seconds(raw, 1, u64::MAX),
        "engine.io heartbeat interval, seconds. Load balancer idle timeouts must be longer.";
    PING_TIMEOUT: Duration = Value("20"), Plain, |raw| seconds(raw, 1, u64::MAX),
        "Seconds a client has to answer a ping.";
    METRICS_MAX_CHANNELS: usize = Value("200"), Plain, |raw| count(raw, 0, usize::MAX),
        "Channels that get a metric series of their own; the rest share `channel=\"_other\"`.";
    SHUTDOWN_TIMEOUT: Duration = Value("10"), Plain, |raw| seconds(raw, 0, u64::MAX),
        "Upper bound, in seconds, of a graceful shutdown.";
    WORKER_THREADS: Option<usize> = Value("auto"), Plain, worker_threads,
        "Threads that run the node's tasks: `auto`, one per core, or a number, at least 1. Set \
         it below the core count when the node shares its machine with other busy processes, \
         whose preemptions take each thread's sockets with them (BENCHMARKS.md, \"One worker \
         thread\").";
    RECOVERY_WINDOW: Duration = Value("120"), Plain, |raw| seconds(raw, 0, u64::MAX),
        "Seconds after a disconnect during which a socket may recover its session (see \
         [Connection state recovery](docs/protocol.md#connection-state-recovery)); `0` turns \
         recovery off, and then no `pid` and no offsets are sent.";
    MAX_BATCH: usize = Value("1000"), Plain, |raw| count(raw, 1, usize::MAX),
        "Most notifications in one `/notify/batch`.";
    MAX_BATCH_BYTES: usize = Value("8388608"), Plain, |raw| count(raw, 1, usize::MAX),
        "Largest `/notify/batch` body (8 MiB).";
    IDEMPOTENCY_WINDOW: Duration = Value("3600"), Plain, |raw| seconds(raw, 1, u64::MAX),
        "Seconds an `Idempotency-Key` on `/notify` answers its first call's answer (see \
         [`POST /notify`](docs/protocol.md#post-notify)).";
    IDEMPOTENCY_MAX_KEYS: usize = Value("100000"), Plain, |raw| count(raw, 1, usize::MAX),
        "The most `Idempotency-Key`s a standalone node keeps (the oldest go first); Redis keeps \
         each for the window.";
    RECOVERY_MAX_MISSED: usize = Value("1000"), Plain, |raw| count(raw, 1, usize::MAX),
        "The most notifications one socket can recover; a socket that missed more gets a fresh \
         session. Also the length of each history stream.";
    REDIS_URL: Vec<String> = Nothing("none: standalone"), Urls, redis_urls,
        "`redis://[user:pass@]host:port[/db]` or `rediss://…` (TLS): the cluster bus. For a \
         Redis Cluster, one or more seed nodes, comma-separated. \
         `redis+sentinel://[user:pass@]host:port[,host:port…]/master[/db]`: the master these \
         Sentinels name (see [Redis Sentinel](docs/operations.md#redis-sentinel)).";
    REDIS_CLUSTER: bool = Value("false"), Plain, parse_bool,
        "`true` for a Redis Cluster (sharded pub/sub, `SPUBLISH`/`SSUBSCRIBE`; with recovery on, \
         every key and topic under the hash tag `{prefix}`).";
    REDIS_PREFIX: String = Value("channels"), Plain, |raw| Ok(raw.to_string()),
        "Prefix of the bus topics, so several gateways can share a Redis.";
    MAX_CONNECTIONS: usize = Value("200000"), Plain, |raw| count(raw, 1, usize::MAX),
        "Open TCP connections per node (HTTP calls and socket.io transports together); past it \
         a connection gets a `503` and is closed. Lowered at start to what the descriptor limit \
         allows (see [Limits](docs/protocol.md#limits)).";
    MAX_SOCKETS_PER_USER: usize = Value("32"), Plain, |raw| count(raw, 1, usize::MAX),
        "Sockets one user may hold on one node; the next gets `connect_error: \
         too_many_sockets`.";
    MAX_JSON_DEPTH: usize = Value("64"), Plain, |raw| count(raw, 1, usize::MAX),
        "Deepest nesting of arrays and objects in a `/notify` `msg`.";
    CONNECT_RATE: Option<Rate> = Value("50:200"), Plain, rate,
        "New socket.io connections (engine.io handshakes) per second per client address, \
         `RATE[:BURST]`, or `off`.";
    AUTHORIZE_RATE: Option<Rate> = Value("20:100"), Plain, rate,
        "`GET /authorize` calls per second per client address, or `off`.";
    NOTIFY_RATE_PER_KEY: Option<Rate> = Value("20000:40000"), Plain, rate,
        "`POST /notify` calls per second per API key, or `off`.";
    NOTIFY_RATE_PER_ADDRESS: Option<Rate> = Value("20000:40000"), Plain, rate,
        "`POST /notify` calls per second per client address, checked before the key, or `off`.";
    CLIENT_ADDRESS_HEADER: HeaderName = Nothing("none: the peer address"), Plain,
        |raw| HeaderName::try_from(raw).map_err(|_| format!("{raw:?} is not a header name")),
        "A header set by a trusted proxy in front of every node that names the client \
         (`X-Forwarded-For`: its last entry is used). Only set it when clients cannot reach the \
         nodes directly, or they can pick their own address.";
    LOG: String = Value("info"), Plain, log_filter,
        "Log filter (`tracing` `EnvFilter` syntax, e.g. `channels=debug,info`).";
    LOG_FORMAT: LogFormat = Value("pretty"), Plain, log_format,
        "`pretty`, or `json` for one JSON object per line.";
}

/// The README's configuration table: a header and one row per setting.
pub fn markdown_table() -> String {
    let mut table = String::from("| Variable | Default | Meaning |\n|---|---|---|\n");
    for about in ALL {
        table += &format!(
            "| `{}` | {} | {} |\n",
            about.name,
            about.default_cell(),
            about.doc
        );
    }
    table
}

/// The `CHANNELS_*` names among `names` that the node does not read, each
/// with the known name nearest to it when one is near (a typo's distance).
pub fn unknown_variables<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, Option<&'static str>)> {
    let known = |name: &str| ALL.iter().any(|about| about.name == name);
    let mut unknown: Vec<_> = names
        .into_iter()
        .filter(|name| name.starts_with("CHANNELS_") && !known(name))
        .map(|name| {
            let nearest = ALL
                .iter()
                .map(|about| (strsim::damerau_levenshtein(name, about.name), about.name))
                .min()
                .filter(|(distance, _)| *distance <= 3)
                .map(|(_, known)| known);
            (name.to_string(), nearest)
        })
        .collect();
    unknown.sort();
    unknown
}

/// One line per unknown variable, for the start-up warning and
/// `check-config`'s error.
pub fn describe_unknown(unknown: &[(String, Option<&'static str>)]) -> Vec<String> {
    unknown
        .iter()
        .map(|(name, nearest)| match nearest {
            Some(known) => format!("{name} is not a channels setting: did you mean {known}?"),
            None => format!("{name} is not a channels setting"),
        })
        .collect()
}

// The parsers. Each says why a value is refused; the caller names the
// variable.

/// `host:port`, where the host is an IP address (IPv6 in brackets), a name
/// resolved once at start (`localhost:3000`), or empty for every interface
/// (`:3000`).
fn listen_address(raw: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let invalid = |reason: String| {
        format!(
            "{raw:?}: {reason}; expected host:port, as 0.0.0.0:3000, [::]:3000, localhost:3000 or :3000"
        )
    };
    if let Ok(addr) = raw.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = raw.rsplit_once(':') else {
        return Err(invalid("no port".into()));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| invalid(format!("{port:?} is not a port")))?;
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let mut resolved: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| invalid(format!("{host:?} does not resolve ({e})")))?
        .collect();
    // IPv4 first: `localhost` then binds where most clients look for it.
    resolved.sort_by_key(|addr| addr.is_ipv6());
    resolved
        .into_iter()
        .next()
        .ok_or_else(|| invalid(format!("{host:?} resolves to no address")))
}

/// A boolean, in any of the usual spellings of env files (Docker,
/// Kubernetes, systemd): `1/0`, `true/false`, `yes/no`, `on/off`, in any
/// case.
pub fn parse_bool(raw: &str) -> Result<bool, String> {
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "{raw:?}: expected 1/0, true/false, yes/no or on/off"
        )),
    }
}

/// A whole number from `min` to `max`.
fn count(raw: &str, min: usize, max: usize) -> Result<usize, String> {
    let n: usize = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not a whole number"))?;
    if n < min {
        return Err(format!("{n}: must be at least {min}"));
    }
    if n > max {
        return Err(format!("{n}: must be at most {max}"));
    }
    Ok(n)
}

/// A whole number of seconds from `min` to `max`.
fn seconds(raw: &str, min: u64, max: u64) -> Result<Duration, String> {
    let secs = count(raw, min as usize, max as usize)?;
    Ok(Duration::from_secs(secs as u64))
}

/// The least length of any shared secret, so that a typo like `secret` is
/// caught at start.
const MIN_SECRET_BYTES: usize = 32;

fn secret(raw: &str) -> Result<Secret, String> {
    if raw.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "must be at least {MIN_SECRET_BYTES} bytes long (a random string)"
        ));
    }
    Ok(Secret::new(raw))
}

/// Comma-separated values, trimmed, the empty ones dropped.
pub fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn non_empty_list(raw: &str) -> Result<Vec<String>, String> {
    let list = split_list(raw);
    if list.is_empty() {
        return Err("no value in the list".into());
    }
    Ok(list)
}

fn jwks_url(raw: &str) -> Result<String, String> {
    if !(raw.starts_with("https://") || raw.starts_with("http://")) {
        return Err("must be an http:// or https:// URL".into());
    }
    Ok(raw.to_string())
}

fn worker_threads(raw: &str) -> Result<Option<usize>, String> {
    match raw {
        "auto" => Ok(None),
        _ => count(raw, 1, 1_024)
            .map(Some)
            .map_err(|e| format!("{e} (or auto)")),
    }
}

/// A [`Rate`], or `off`.
fn rate(raw: &str) -> Result<Option<Rate>, String> {
    match raw {
        "off" => Ok(None),
        _ => raw
            .parse()
            .map(Some)
            .map_err(|e| format!("{e} (RATE[:BURST], or off)")),
    }
}

/// One `redis://` or `rediss://` URL, several for a cluster's seeds, or
/// one `redis+sentinel://` URL (whose host list has the commas).
fn redis_urls(raw: &str) -> Result<Vec<String>, String> {
    if raw.starts_with(SENTINEL_SCHEME) {
        SentinelUrl::parse(raw)?;
        return Ok(vec![raw.to_string()]);
    }
    let urls = non_empty_list(raw)?;
    if let Some(bad) = urls
        .iter()
        .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
    {
        return Err(format!(
            "{:?} is not a redis://, rediss:// or redis+sentinel:// URL",
            // Never a password in an error.
            bad.split('@').next_back().unwrap_or_default()
        ));
    }
    Ok(urls)
}

fn log_filter(raw: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(raw)
        .map_err(|e| format!("{raw:?}: {e}"))?;
    Ok(raw.to_string())
}

fn log_format(raw: &str) -> Result<LogFormat, String> {
    match raw {
        "pretty" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{raw:?}: expected pretty or json")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value that applies when a variable is unset, in either mode,
    /// passes its own parser: reading falls back to them.
    #[test]
    fn every_default_passes_its_own_parser() {
        for about in ALL {
            for dev_mode in [false, true] {
                if let Some(value) = about.unset_value(dev_mode)
                    && let Err(e) = (about.validate)(value)
                {
                    panic!("{} default {value:?}: {e}", about.name);
                }
            }
        }
    }

    #[test]
    fn the_readme_table_is_the_settings_table() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("| Variable | Default | Meaning |")
            .expect("README has the configuration table");
        let table: String = readme[start..]
            .lines()
            .take_while(|line| line.starts_with('|'))
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(
            table == markdown_table(),
            "README.md's configuration table differs from src/config/settings.rs; \
             it should read:\n\n{}",
            markdown_table()
        );
    }

    #[test]
    fn every_variable_the_code_reads_is_declared() {
        let known = |name: &str| ALL.iter().any(|about| about.name == name);
        for source in [
            include_str!("mod.rs"),
            include_str!("../cli.rs"),
            include_str!("../lib.rs"),
        ] {
            // The code, not these tests' misspellings.
            let code = source.split("#[cfg(test)]").next().unwrap_or_default();
            for read in code.split('"').filter(|s| {
                s.len() > "CHANNELS_".len()
                    && s.starts_with("CHANNELS_")
                    && s.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            }) {
                assert!(known(read), "{read} is read but not declared");
            }
        }
    }

    #[test]
    fn unknown_variables_are_named_with_the_nearest_known_one() {
        let unknown = unknown_variables([
            "CHANNELS_LISTN",
            "CHANNELS_API_KEY",
            "CHANNELS_LISTEN",
            "CHANNELS_SOMETHING_ELSE_ENTIRELY",
            "PATH",
        ]);
        assert_eq!(
            unknown,
            vec![
                ("CHANNELS_API_KEY".to_string(), Some("CHANNELS_API_KEYS")),
                ("CHANNELS_LISTN".to_string(), Some("CHANNELS_LISTEN")),
                ("CHANNELS_SOMETHING_ELSE_ENTIRELY".to_string(), None),
            ]
        );
    }

    #[test]
    fn the_listen_address_takes_a_name_or_an_empty_host() {
        assert_eq!(
            listen_address("127.0.0.1:3000").unwrap().to_string(),
            "127.0.0.1:3000"
        );
        assert_eq!(
            listen_address("[::1]:3000").unwrap().to_string(),
            "[::1]:3000"
        );
        assert_eq!(listen_address(":3000").unwrap().to_string(), "0.0.0.0:3000");
        assert_eq!(listen_address("localhost:3000").unwrap().port(), 3000);
        assert!(listen_address("localhost:3000").unwrap().ip().is_loopback());
        for bad in [
            "nowhere",
            "localhost",
            "localhost:http",
            ":99999",
            "no-such-host.invalid:3000",
        ] {
            let e = listen_address(bad).unwrap_err();
            assert!(e.contains("expected host:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn rates_take_a_burst_or_off() {
        let rate = |raw| {
            super::rate(raw)
                .unwrap()
                .map(|r| (r.per_second.get(), r.burst.get()))
        };
        assert_eq!(rate("50:200"), Some((50, 200)));
        assert_eq!(rate("7"), Some((7, 7)));
        assert_eq!(rate("off"), None);
        for bad in ["0", "ten", "5:", ":5", "-1"] {
            assert!(super::rate(bad).is_err(), "{bad}");
        }
    }
}
