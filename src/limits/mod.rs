//! Admission control: how much one client address, one API key, one user or
//! the whole internet may ask of a node before it is told to slow down.
//!
//! Every refusal is counted in `channels_limit_refusals_total{limit}` and
//! answered with a clear error: `429 rate_limited` with `Retry-After` for the
//! rate limits, `connect_error: too_many_sockets` for a user over its socket
//! cap, `503` for a connection past the node's cap (see [`listener`]).
//!
//! Rates are GCRA token buckets from the `governor` crate, keyed by client
//! address or API key. The per-address tables would grow with every address
//! ever seen, so [`Limiters::forget_idle`] drops the buckets that are full
//! again (an address that has been quiet long enough to have its whole burst
//! back is indistinguishable from a new one).

pub mod descriptors;
pub mod listener;

use std::{hash::Hash, net::IpAddr, sync::Arc, time::Duration};

use axum::http::{HeaderMap, HeaderName};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::keyed::DefaultKeyedStateStore,
};

use crate::{
    config::{Rate, RateLimits},
    metrics::{Limit, Metrics},
};

pub use listener::{ConnectionLimit, PeerAddr, Place, bind};

/// A refused call: which limit, and when the caller may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The `limit` label, also shown to the caller.
    pub limit: Limit,
    pub retry_after: Duration,
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// The node's rate limiters. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Limiters {
    inner: Arc<Inner>,
}

struct Inner {
    connect: Option<Keyed<IpAddr>>,
    authorize: Option<Keyed<IpAddr>>,
    notify_per_key: Option<Keyed<usize>>,
    notify_per_address: Option<Keyed<IpAddr>>,
    client_address_header: Option<HeaderName>,
    metrics: Metrics,
}

fn keyed<K: Hash + Eq + Clone>(rate: Option<Rate>) -> Option<Keyed<K>> {
    rate.map(|r| RateLimiter::keyed(Quota::per_second(r.per_second).allow_burst(r.burst)))
}

impl Limiters {
    pub fn new(limits: &RateLimits, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                connect: keyed(limits.connect),
                authorize: keyed(limits.authorize),
                notify_per_key: keyed(limits.notify_per_key),
                notify_per_address: keyed(limits.notify_per_address),
                client_address_header: limits.client_address_header.clone(),
                metrics,
            }),
        }
    }

    /// A new socket.io connection (engine.io handshake) from `client`.
    pub fn check_connect(&self, client: IpAddr) -> Result<(), Refused> {
        self.check(&self.inner.connect, &client, Limit::ConnectRate)
    }

    /// A `GET /authorize` call from `client`.
    pub fn check_authorize(&self, client: IpAddr) -> Result<(), Refused> {
        self.check(&self.inner.authorize, &client, Limit::AuthorizeRate)
    }

    /// A `POST /notify` call from `client`, before its key is known.
    pub fn check_notify_address(&self, client: IpAddr) -> Result<(), Refused> {
        self.check(
            &self.inner.notify_per_address,
            &client,
            Limit::NotifyRatePerAddress,
        )
    }

    /// A `POST /notify` call with the accepted API key number `key`.
    pub fn check_notify_key(&self, key: usize) -> Result<(), Refused> {
        self.check(&self.inner.notify_per_key, &key, Limit::NotifyRatePerKey)
    }

    fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: &Option<Keyed<K>>,
        key: &K,
        limit: Limit,
    ) -> Result<(), Refused> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter.check_key(key).map_err(|not_until| {
            self.refused(limit);
            Refused {
                limit,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }
        })
    }

    /// Counts a refusal by `limit` (also for the limits enforced elsewhere).
    pub fn refused(&self, limit: Limit) {
        self.inner.metrics.limit_refused(limit);
    }

    /// The address a call comes from: the peer, or the last entry of the
    /// trusted proxy's header when one is configured and present.
    pub fn client_address(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        self.inner
            .client_address_header
            .as_ref()
            .and_then(|name| headers.get_all(name).iter().next_back())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(peer)
    }

    /// Drops the buckets of keys that have their whole burst back, so the
    /// tables hold only recently active addresses. Run periodically.
    pub fn forget_idle(&self) {
        let inner = &self.inner;
        for limiter in [&inner.connect, &inner.authorize, &inner.notify_per_address]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// How often [`Limiters::forget_idle`] runs.
pub const FORGET_INTERVAL: Duration = Duration::from_secs(30);

/// Whether `raw`, a valid JSON text, nests arrays and objects deeper than
/// `max` levels. A plain scan, without recursion or allocation, so a
/// 100,000-level message costs one pass over its bytes.
pub fn nested_deeper_than(raw: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in raw.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert!(!nested_deeper_than(r#"{"a":[1,{"b":2}]}"#, 3));
        assert!(nested_deeper_than(r#"{"a":[1,{"b":2}]}"#, 2));
        assert!(!nested_deeper_than(r#"["[[[[\"{{{{"]"#, 1));
        assert!(!nested_deeper_than(r#""\\""#, 0));
        assert!(!nested_deeper_than("12", 0));
        assert!(nested_deeper_than(&"[".repeat(100_000), 64));
    }

    #[test]
    fn a_limiter_refuses_past_the_burst_and_counts_it() {
        let metrics = Metrics::new(1);
        let limits = RateLimits {
            authorize: Some("1:3".parse().unwrap()),
            ..Default::default()
        };
        let limiters = Limiters::new(&limits, metrics.clone());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiters.check_authorize(a).is_ok());
        }
        let refused = limiters.check_authorize(a).unwrap_err();
        assert_eq!(refused.limit, Limit::AuthorizeRate);
        assert!(refused.retry_after <= Duration::from_secs(1));
        assert!(
            limiters.check_authorize(b).is_ok(),
            "other addresses are not affected"
        );
        assert!(
            limiters.check_connect(a).is_ok(),
            "an unset limit never refuses"
        );
        assert!(
            metrics
                .render()
                .contains(r#"channels_limit_refusals_total{limit="authorize_rate"} 1"#)
        );
    }

    #[test]
    fn addresses_with_their_whole_burst_back_are_forgotten() {
        let limits = RateLimits {
            connect: Some("1000:1".parse().unwrap()),
            ..Default::default()
        };
        let limiters = Limiters::new(&limits, Metrics::new(1));
        for i in 0..100u8 {
            let _ = limiters.check_connect(IpAddr::from([10, 0, 0, i]));
        }
        let tracked = || limiters.inner.connect.as_ref().unwrap().len();
        assert_eq!(tracked(), 100);
        std::thread::sleep(Duration::from_millis(20)); // 1000/s: refilled after 1 ms
        limiters.forget_idle();
        assert_eq!(tracked(), 0);
    }

    #[test]
    fn the_client_address_comes_from_the_trusted_header_only_when_configured() {
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().unwrap(),
        );
        let plain = Limiters::new(&RateLimits::default(), Metrics::new(1));
        assert_eq!(plain.client_address(&headers, peer), peer);
        let proxied = Limiters::new(
            &RateLimits {
                client_address_header: Some(HeaderName::from_static("x-forwarded-for")),
                ..Default::default()
            },
            Metrics::new(1),
        );
        assert_eq!(
            proxied.client_address(&headers, peer),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(proxied.client_address(&headers, peer), peer);
    }
}
