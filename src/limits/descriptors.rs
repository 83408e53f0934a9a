//! How many connections the process's descriptor limit leaves room for.
//!
//! Every TCP connection is a file descriptor. A node whose connections take
//! them all can no longer accept: not a load balancer's health check, not
//! its own `/metrics`, not a reconnect to Redis, and the kernel answers
//! `EMFILE` to every `accept`. So `CHANNELS_MAX_CONNECTIONS` is clamped
//! below the soft `RLIMIT_NOFILE`, which the node first raises to the hard
//! limit (the kernel lets any process do that), leaving [`KEPT`] for the
//! node itself.

use std::io;

/// Descriptors kept out of the connection cap: the node's own (the
/// listener, the runtime's, Redis connections, files it reads, about 30
/// with Redis) and the connections it takes past the cap to answer them
/// (`listener::OVER_CAP`: `/healthz`, `/metrics`, a `503` to the rest).
pub const KEPT: u64 = 64 + super::listener::OVER_CAP as u64;

/// Raises the soft descriptor limit to the hard one, and returns the soft
/// limit now in force (`u64::MAX` for unlimited). Only the process's own
/// limit changes; a failure leaves it as it was.
pub fn raise() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The hard descriptor limit (`u64::MAX` for unlimited): the soft limit a
/// node will raise itself to.
pub fn hard_limit() -> io::Result<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(_, hard)| hard)
}

/// The connection cap the node applies: `configured`, or less when the
/// descriptor `limit` leaves less room. An error says how far to raise a
/// limit too low to serve at all.
pub fn cap(configured: usize, limit: u64) -> Result<Cap, String> {
    let room = limit.saturating_sub(KEPT);
    if room == 0 {
        return Err(format!(
            "the descriptor limit (ulimit -n) is {limit}: a node needs more than {KEPT}; raise it"
        ));
    }
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    Ok(if configured <= room {
        Cap {
            applied: configured,
            why: None,
        }
    } else {
        Cap {
            applied: room,
            why: Some(format!(
                "the descriptor limit is {limit}, of which {KEPT} are kept for the node's own use"
            )),
        }
    })
}

/// The connection cap in force, and why it is below the configured one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    pub applied: usize,
    /// Set when the descriptor limit lowered the configured cap.
    pub why: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_kept_descriptors_free() {
        assert_eq!(
            cap(200_000, 20_000).unwrap().applied,
            20_000 - KEPT as usize
        );
        assert!(cap(200_000, 20_000).unwrap().why.unwrap().contains("20000"));
        let under = cap(1_000, 20_000).unwrap();
        assert_eq!(
            under,
            Cap {
                applied: 1_000,
                why: None
            }
        );
        assert_eq!(cap(5, u64::MAX).unwrap().applied, 5);
        assert!(cap(5, KEPT).unwrap_err().contains("ulimit -n"));
        assert_eq!(cap(200_000, KEPT + 1).unwrap().applied, 1);
    }
}
