//! The recovery history in Redis, and the records recovery reads beside it.
//!
//! * **One sequence, assigned with the publish.** [`PUBLISH_SCRIPT`]
//!   takes the notifications queued together (one or many) and, atomically,
//!   reserves their numbers with one `INCRBY` of `{prefix}:seq`, then for
//!   each `XADD`s it to the target's stream with its number as the entry id
//!   and `PUBLISH`es `"<seq> <json>"`: an entry is in the history exactly
//!   when its message went out, and the numbers follow the order every
//!   subscriber receives in. One call for several notifications because
//!   a script's run costs Redis more than the commands in it (BENCHMARKS.md,
//!   "What bounds each figure").
//!   (Lua numbers are doubles: offsets stay below 2^53, exact, until the
//!   year 2255, and are formatted with `%.0f`, never in exponent form.)
//!   The sequence starts at Redis's clock in ms × 1000 when its key is
//!   missing, so after a Redis that lost its data comes back the new
//!   offsets are above every old one.
//! * **Streams** `{prefix}:h:c:{channel}` and `{prefix}:h:u:{user}`, capped
//!   at `CHANNELS_RECOVERY_MAX_MISSED` entries (`MAXLEN ~`, whole nodes) and
//!   expiring after the retention (`super::super::history::retention`)
//!   without a publish.
//! * **Session ends** `{prefix}:r:{session}`: `"<ms>"` or `"closed"`, kept
//!   for the window; written by the node that held the socket.
//! * **Heartbeats** `{prefix}:n:{node}`: `"<ms>"` every second, `"<ms>
//!   stopped"` at a graceful shutdown, kept for the retention, so a session
//!   whose node died without writing its end can still be judged.
//! * **The history's epoch** `{prefix}:epoch`: the first offset of the
//!   history as it is now, and `{prefix}:master`, the replication id of
//!   the Redis that holds it. A replica promoted by a failover may lack the
//!   last writes of its master (replication is asynchronous): the numbers
//!   it hands out next could repeat offsets that clients already hold, and
//!   a history read could miss what was lost. So when a node connects to a
//!   Redis whose replication id is not the recorded one ([`EPOCH_SCRIPT`]:
//!   a promoted replica, or a Redis restarted without its data; on a Redis
//!   Cluster, the master of the keys' slot), the
//!   sequence jumps past every offset handed out before (to Redis's clock
//!   in ms × 1000, as a new sequence starts) and the epoch starts there;
//!   an offset from before the epoch is not recovered: the socket gets a
//!   fresh session (`recovered` false), never a partial replay.
//! * **Evictions** `{prefix}:evicted`: Redis's count of evicted keys
//!   (`INFO stats`) when the epoch began. A Redis with `maxmemory` and an
//!   eviction policy may drop any key, a stream among them, and a stream
//!   that is gone reads as one that held nothing: a socket would be told it
//!   recovered, without what it missed. So when the count has moved (or
//!   the record is gone while the count is not zero), [`RECOVER_SCRIPT`]
//!   begins a new epoch at the next offset and records the count: no
//!   session from before that read is recovered (the eviction happened
//!   at some point before it; Redis does not say when, nor what it took).
//!   Whichever script notices an eviction first (a recovery read, a
//!   node's connect, a catch-up) records that epoch's first offset in
//!   `{prefix}:evicted-from`, so a node catching up from before it learns
//!   of the eviction though another noticed it ([`CATCH_UP_SCRIPT`]).
//! * [`RECOVER_SCRIPT`] reads the session's record, its node's heartbeat,
//!   the epoch and both of its streams after the offset in one round trip.
//!
//! On a Redis Cluster every key and topic carries the hash tag `{prefix}`
//! (see `super::key_prefix`): one slot, which the script reaches whole.

use redis::{Script, Value};
use std::sync::{Arc, LazyLock};

use super::super::history::{Missed, Recovering, StreamKey, StreamRead};
use crate::{
    notification::{Channel, KeycloakId, Notification, Target},
    recovery::{Ended, NodeId, Offset, Origin, Session},
};

/// Lua, put before the history scripts:
/// `clock_base()` is Redis's clock in ms × 1000, where a new sequence
/// starts; `evicted_keys()` is Redis's count of evicted keys, as text;
/// `evictions_seen(evictions)` records that count and returns whether it
/// moved since it was recorded (see the module documentation);
/// `check_evictions(sequence, epoch, evictions, evicted_from)` begins a
/// new epoch, and records where in `evicted_from`, when it did, and
/// returns whether it did; `read_stream(out, stream, from, to, count)`
/// appends to `out` the stream's entries ever added, its length, its first
/// id, and at most `count` of its entries from `from` to `to`.
const PRELUDE: &str = r"
local function clock_base()
  local now = redis.call('TIME')
  return (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) * 1000
end
local function evicted_keys()
  return string.match(redis.call('INFO', 'stats'), 'evicted_keys:(%d+)') or ''
end
local function evictions_seen(evictions)
  local evicted = evicted_keys()
  local recorded = redis.call('GET', evictions)
  if recorded == evicted then return false end
  redis.call('SET', evictions, evicted)
  return recorded ~= false or evicted ~= '0'
end
local function check_evictions(sequence, epoch, evictions, evicted_from)
  if not evictions_seen(evictions) then return false end
  local seq = redis.call('GET', sequence)
  local base
  if seq then
    base = tonumber(seq) + 1
  else
    base = clock_base()
  end
  local text = string.format('%.0f', base)
  redis.call('SET', epoch, text)
  redis.call('SET', evicted_from, text)
  return true
end
local function read_stream(out, stream, from, to, count)
  if redis.call('EXISTS', stream) == 1 then
    local info = redis.call('XINFO', 'STREAM', stream)
    local fields = {}
    for j = 1, #info, 2 do fields[info[j]] = info[j + 1] end
    table.insert(out, fields['entries-added'])
    table.insert(out, fields['length'])
    table.insert(out, fields['recorded-first-entry-id'])
    table.insert(out, redis.call('XRANGE', stream, from, to, 'COUNT', count))
  else
    table.insert(out, 0)
    table.insert(out, 0)
    table.insert(out, '0-0')
    table.insert(out, {})
  end
end
";

/// See the module documentation. KEYS: the sequence, each item's stream,
/// then the `Idempotency-Key` records of the items that have one. ARGV:
/// the number of items, max entries per stream, retention in ms, the
/// publish command (`PUBLISH`, or `SPUBLISH` on a Redis Cluster), a
/// record's lifetime in ms, then four per item: its topic, its payload, the
/// `KEYS` index of its record (`0`: none) and the record's value. Returns
/// one line per item, its offset and how many subscribers (nodes) received
/// it, or `0` and the error (a stream key of another type, say) when its
/// writes failed: an item's failure fails only that item, as separate calls
/// would. One string, since the node parses each value of a reply at a
/// cost ([`super::publisher::decode_published`]).
pub static PUBLISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[PRELUDE, r"
local function failed(reply) return type(reply) == 'table' and reply.err ~= nil end
local n = tonumber(ARGV[1])
local last = redis.call('INCRBY', KEYS[1], n)
if last == n then
  last = clock_base() + n
  redis.call('SET', KEYS[1], string.format('%.0f', last))
end
local out = {}
for i = 1, n do
  local at = 4 * i + 2
  local seq = string.format('%.0f', last - n + i)
  local reply = redis.pcall('XADD', KEYS[1 + i], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'n', ARGV[at + 1])
  if not failed(reply) then
    redis.pcall('PEXPIRE', KEYS[1 + i], ARGV[3])
    local record = tonumber(ARGV[at + 2])
    if record > 0 then
      reply = redis.pcall('SET', KEYS[record], ARGV[at + 3], 'PX', ARGV[5])
    end
  end
  if not failed(reply) then
    reply = redis.pcall(ARGV[4], ARGV[at], seq .. ' ' .. ARGV[at + 1])
  end
  if failed(reply) then
    out[i] = '0 ' .. (string.gsub(reply.err, '\n', ' '))
  else
    out[i] = seq .. ' ' .. reply
  end
end
return table.concat(out, '\n')
"].concat(),
    )
});

/// See the module documentation. KEYS: the recorded replication id, the
/// sequence, the epoch, the evictions record and where the history was
/// last found evicted. The replication id is read
/// here, on the Redis that holds the keys: on a Redis Cluster, the master
/// of their slot. Returns 1 when a new epoch began (else 0), and the
/// sequence's current value.
pub static EPOCH_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            PRELUDE,
            r"
local began = 0
local id = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
if redis.call('GET', KEYS[1]) ~= id then
  local base = clock_base()
  local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
  if seq >= base then base = seq + 1 end
  local text = string.format('%.0f', base)
  redis.call('SET', KEYS[2], text)
  redis.call('SET', KEYS[3], text)
  redis.call('SET', KEYS[1], id)
  if evictions_seen(KEYS[4]) then redis.call('SET', KEYS[5], text) end
  began = 1
end
return { began, redis.call('GET', KEYS[2]) or '0' }
",
        ]
        .concat(),
    )
});

/// KEYS: session record, origin heartbeat, epoch, channel stream, user
/// stream, the sequence, the evictions record, where the history was last
/// found evicted. ARGV: the offset after
/// which to read, the most entries per stream. First begins a new epoch if
/// Redis evicted keys since the last one (see the module documentation).
/// Returns the record, the heartbeat, the epoch, then per stream its
/// entries ever added, its length, its first id and its entries after the
/// offset.
pub static RECOVER_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            PRELUDE,
            r"
check_evictions(KEYS[6], KEYS[3], KEYS[7], KEYS[8])
local out = { redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3]) }
for i = 4, 5 do
  read_stream(out, KEYS[i], '(' .. ARGV[1] .. '-0', '+', ARGV[2])
end
return out
",
        ]
        .concat(),
    )
});

/// KEYS: the sequence, the epoch, the evictions record, where the history
/// was last found evicted, then the streams to read. ARGV: the offset
/// after which to read, the offset up to which, the most entries per
/// stream. Returns whether Redis evicted keys after that offset (any
/// stream may have lost entries): seen by this call, or by an earlier
/// script of any node, which recorded the offset its new epoch began at;
/// then per stream what [`RECOVER_SCRIPT`] returns of one.
pub static CATCH_UP_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            PRELUDE,
            r"
local evicted = check_evictions(KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  or tonumber(redis.call('GET', KEYS[4]) or '0') > tonumber(ARGV[1])
local out = { evicted and 1 or 0 }
for i = 5, #KEYS do
  read_stream(out, KEYS[i], '(' .. ARGV[1] .. '-0', ARGV[2] .. '-0', ARGV[3])
end
return out
",
        ]
        .concat(),
    )
});

/// Key names under the bus's prefix.
pub struct Keys<'a>(pub &'a str);

impl Keys<'_> {
    pub fn sequence(&self) -> String {
        format!("{}:seq", self.0)
    }
    pub fn stream(&self, key: &StreamKey) -> String {
        match key {
            StreamKey::Channel(channel) => format!("{}:h:c:{channel}", self.0),
            StreamKey::User(user) => format!("{}:h:u:{user}", self.0),
        }
    }
    pub fn session(&self, session: &Session) -> String {
        format!("{}:r:{:032x}", self.0, session.id)
    }
    pub fn idempotency(&self, key: &crate::idempotency::IdempotencyKey) -> String {
        format!("{}:i:{}", self.0, key.digest())
    }
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.0)
    }
    pub fn master(&self) -> String {
        format!("{}:master", self.0)
    }
    pub fn evicted(&self) -> String {
        format!("{}:evicted", self.0)
    }
    pub fn evicted_from(&self) -> String {
        format!("{}:evicted-from", self.0)
    }
    pub fn heartbeat(&self, node: NodeId) -> String {
        format!("{}:n:{:016x}", self.0, node.0)
    }
}

/// The target whose notifications a topic carries: a channel's
/// (`{prefix}:c:{channel}`) or a user's (`{prefix}:u:{user}`), whose
/// stream keeps them; `None` for the bus's own topics (requests, replies,
/// take-overs).
pub fn topic_target(prefix: &str, topic: &str) -> Option<Target> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix(':')?;
    match rest.split_once(':')? {
        ("c", channel) => Some(Target::Channel {
            channel: Channel::parse(channel).ok()?,
        }),
        ("u", user) => Some(Target::User {
            keycloak: KeycloakId::parse(user).ok()?,
        }),
        _ => None,
    }
}

/// The value of a session's end record.
pub fn ended_value(ended: Ended) -> String {
    match ended {
        Ended::At(ms) => ms.to_string(),
        Ended::Closed => "closed".into(),
    }
}

/// The value of a heartbeat.
pub fn heartbeat_value(at_ms: u64, stopped: bool) -> String {
    if stopped {
        format!("{at_ms} stopped")
    } else {
        at_ms.to_string()
    }
}

/// What [`RECOVER_SCRIPT`] answered, decoded.
pub struct RecoverReply {
    pub ended: Option<Ended>,
    pub origin: Origin,
    pub reads: Vec<StreamRead>,
}

/// Decodes [`RECOVER_SCRIPT`]'s answer; `None` when it is not of its shape.
pub fn decode_recover(value: Value, recovering: &Recovering) -> Option<RecoverReply> {
    let Value::Array(parts) = value else {
        return None;
    };
    let [record, heartbeat, epoch, streams @ ..] = parts.as_slice() else {
        return None;
    };
    // An offset from before the epoch may have lost what followed it.
    let epoch: Offset = match text(epoch) {
        None => 0,
        Some(epoch) => epoch.parse().ok()?,
    };
    let lost = recovering.after < epoch;
    let ended = match text(record) {
        None => None,
        Some("closed") => Some(Ended::Closed),
        Some(ms) => Some(Ended::At(ms.parse().ok()?)),
    };
    let origin = match text(heartbeat) {
        None => Origin::Unknown,
        Some(beat) => {
            let (ms, stopped) = match beat.split_once(' ') {
                Some((ms, "stopped")) => (ms, true),
                _ => (beat, false),
            };
            Origin::Seen {
                at_ms: ms.parse().ok()?,
                stopped,
            }
        }
    };
    Some(RecoverReply {
        ended,
        origin,
        reads: decode_reads(streams, recovering.after, lost)?,
    })
}

/// Decodes [`CATCH_UP_SCRIPT`]'s answer: whether Redis evicted keys, and
/// each stream's read after `after`; `None` when it is not of its shape.
pub fn decode_catch_up(value: Value, after: Offset) -> Option<(bool, Vec<StreamRead>)> {
    let Value::Array(parts) = value else {
        return None;
    };
    let [evicted, streams @ ..] = parts.as_slice() else {
        return None;
    };
    let evicted = integer(evicted)? == 1;
    Some((evicted, decode_reads(streams, after, evicted)?))
}

/// Decodes `read_stream`'s four values per stream; with `lost`, every
/// read counts as one that may lack something after `after`.
fn decode_reads(streams: &[Value], after: Offset, lost: bool) -> Option<Vec<StreamRead>> {
    let mut reads = Vec::new();
    for stream in streams.chunks(4) {
        let [added, length, first, entries] = stream else {
            return None;
        };
        let (added, length) = (integer(added)?, integer(length)?);
        let first = id_sequence(text(first)?)?;
        // Trimming drops the oldest entries, all of them before `first`:
        // something after the offset may be gone only if `first` is
        // beyond the entry right after the offset.
        let trimmed_after = lost || (added > length && first.saturating_sub(1) > after);
        let Value::Array(entries) = entries else {
            return None;
        };
        let entries = entries
            .iter()
            .map(decode_entry)
            .collect::<Option<Vec<Missed>>>()?;
        reads.push(StreamRead {
            entries,
            trimmed_after,
        });
    }
    Some(reads)
}

/// One stream entry: `[id, ["n", payload]]`.
pub fn decode_entry(entry: &Value) -> Option<Missed> {
    let Value::Array(entry) = entry else {
        return None;
    };
    let [id, Value::Array(fields)] = entry.as_slice() else {
        return None;
    };
    let [_, Value::BulkString(payload)] = fields.as_slice() else {
        return None;
    };
    let notification: Notification = serde_json::from_slice(payload).ok()?;
    Some((id_sequence(text(id)?)?, Arc::new(notification)))
}

/// The sequence number of a stream id `"<seq>-0"`.
fn id_sequence(id: &str) -> Option<Offset> {
    id.split_once('-')?.0.parse().ok()
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// Splits a bus message `"<seq> <json>"`.
pub fn split_message(payload: &[u8]) -> Option<(Offset, &[u8])> {
    let space = payload.iter().position(|&b| b == b' ')?;
    let offset = std::str::from_utf8(&payload[..space]).ok()?.parse().ok()?;
    Some((offset, &payload[space + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_carries_the_notifications_of_one_target() {
        let target = |topic| topic_target("{channels}", topic);
        assert_eq!(
            target("{channels}:c:admin"),
            Some(Target::Channel {
                channel: Channel::parse("admin").unwrap()
            })
        );
        // A keycloak id may hold a colon.
        assert_eq!(
            target("{channels}:u:alice:1"),
            Some(Target::User {
                keycloak: KeycloakId::parse("alice:1").unwrap()
            })
        );
        assert_eq!(target("{channels}:requests"), None);
        assert_eq!(target("{channels}:replies:00ff"), None);
        assert_eq!(target("{channels}:takeover"), None);
        assert_eq!(target("other:c:admin"), None);
    }

    #[test]
    fn a_bus_message_is_its_offset_then_its_json() {
        assert_eq!(
            split_message(b"42 {\"a\":1}"),
            Some((42, &b"{\"a\":1}"[..]))
        );
        assert_eq!(split_message(b"{\"a\":1}"), None);
        assert_eq!(split_message(b"x {}"), None);
    }
}
