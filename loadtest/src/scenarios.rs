//! The benchmark scenarios. Each starts its own servers, drives them from
//! this process over loopback, and returns a [`Report`]. Every loop is
//! bounded in count and time.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::json;
use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinSet,
};

use crate::{
    client::{Client, Event, Sources, Transport},
    poster::Poster,
    report::{Latencies, Report, now_us},
    servers::{
        KernelSockets, Kind, Programs, Redis, Server, TICKS_PER_SECOND, generator_cpu_ticks,
    },
};

/// Handshakes in flight at once while connecting.
const CONNECT_CONCURRENCY: usize = 256;
/// How long receivers wait for the last notifications after the posters stop.
const DRAIN: Duration = Duration::from_secs(2);
/// How often a long phase (connecting, holding, posting) prints a progress
/// line on stderr.
const PROGRESS: Duration = Duration::from_secs(5);

/// The sizes of a run.
#[derive(Clone, Debug, clap::Args)]
pub struct Sizes {
    /// Socket connections (idle, fanout) or users with one socket each
    /// (targeted, cluster).
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    /// Concurrent `/notify` posters (targeted, cluster, idle's final round).
    #[arg(long, default_value_t = 32)]
    pub posters: usize,
    /// Seconds of posting (targeted, cluster) or holding (idle).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Fanout: notifications to send.
    #[arg(long, default_value_t = 1000)]
    pub notifies: u64,
    /// Fanout: notifications not yet received by every socket, at most.
    #[arg(long, default_value_t = 16)]
    pub window: u64,
    /// Fanout: notifications per second, at most (0: as fast as the window
    /// allows). Below saturation, the latency is the server's, not the
    /// window's queueing.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// The clients' engine.io transport.
    #[arg(long, value_enum, default_value_t = Transport::Websocket)]
    pub transport: Transport,
}

/// The ws-token `auth` payload of user `i` in `channel`.
fn auth(tokens: &channels::auth::WsTokens, i: usize, channel: &str) -> String {
    let user = channels::notification::KeycloakId::parse(&format!("u{i}")).expect("valid id");
    json!({"token": tokens.mint(&user), "keycloakID": format!("u{i}"), "channel": channel})
        .to_string()
}

fn tokens() -> channels::auth::WsTokens {
    channels::auth::WsTokens::new(
        &channels::config::Secret::new(crate::servers::WS_SECRET),
        Duration::from_secs(3600),
    )
}

/// What the receivers of a run collected.
struct Received {
    latencies: Latencies,
    received: u64,
    out_of_order: u64,
    /// Clients the server closed before the run stopped them.
    closed: u64,
}

/// Connects users `0..n`, user `i` to `servers[i % len]` in `channel(i)`,
/// at most [`CONNECT_CONCURRENCY`] handshakes at a time, each in its own
/// task. Once connected, a client records every notification's latency and
/// checks that sequence numbers only grow (calling `each` with them), and
/// answers pings, until `stop`. Returns once every client is connected,
/// with the connect rate.
async fn connect_and_receive(
    servers: &[SocketAddr],
    transport: Transport,
    n: usize,
    channel: impl Fn(usize) -> String,
    stop: &watch::Receiver<bool>,
    each: impl Fn(u64) + Clone + Send + 'static,
) -> anyhow::Result<(JoinSet<anyhow::Result<Received>>, f64)> {
    let tokens = tokens();
    let sources = Arc::new(Sources::new());
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (connected_tx, mut connected) = mpsc::channel::<()>(CONNECT_CONCURRENCY);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let payload = auth(&tokens, i, &channel(i));
        let server = servers[i % servers.len()];
        let (sources, gate, connected_tx) = (sources.clone(), gate.clone(), connected_tx.clone());
        let (mut stop, each) = (stop.clone(), each.clone());
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.expect("open semaphore");
            let mut client = Client::connect(server, &sources, &payload, transport, None)
                .await
                .with_context(|| format!("socket {i}"))?;
            drop(permit);
            let _ = connected_tx.send(()).await;
            let mut out = Received {
                latencies: Latencies::new(),
                received: 0,
                out_of_order: 0,
                closed: 0,
            };
            let mut last = 0;
            // One wait for the stop, for the client's whole life: a new
            // `changed()` per notification would register with the watch
            // channel, under its lock, for every delivery.
            let stopped = stop.changed();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    event = client.next_event() => match event {
                        Event::Notification(stamp) => {
                            out.latencies.record(now_us().saturating_sub(stamp.t));
                            out.received += 1;
                            if stamp.n <= last {
                                out.out_of_order += 1;
                            }
                            last = stamp.n;
                            each(stamp.n);
                        }
                        Event::Closed => {
                            out.closed = 1;
                            break;
                        }
                    },
                    _ = &mut stopped => break,
                }
            }
            Ok(out)
        });
    }
    drop(connected_tx);
    let mut progress = Instant::now();
    for done in 1..=n {
        if connected.recv().await.is_none() {
            // Every sender is gone: a connection failed; its task says why.
            while let Some(result) = tasks.join_next().await {
                result.expect("client task")?;
            }
            anyhow::bail!("a client task ended before connecting");
        }
        if progress.elapsed() > PROGRESS {
            eprintln!("  connected {done}/{n}");
            progress = Instant::now();
        }
    }
    Ok((tasks, n as f64 / started.elapsed().as_secs_f64()))
}

async fn collect(mut tasks: JoinSet<anyhow::Result<Received>>) -> anyhow::Result<Received> {
    let mut all = Received {
        latencies: Latencies::new(),
        received: 0,
        out_of_order: 0,
        closed: 0,
    };
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("client task")?;
        all.latencies.merge(&r.latencies);
        all.received += r.received;
        all.out_of_order += r.out_of_order;
        all.closed += r.closed;
    }
    Ok(all)
}

/// The body of a benchmark notification to `target` (the body's target
/// fields, JSON without braces), stamped with the time and sequence `n`.
fn body(target: &str, n: u64) -> String {
    format!(r#"{{{target},"msg":{{"t":{},"n":{n}}}}}"#, now_us())
}

/// Hold `connections` idle sockets; report memory per connection and
/// connect rate; then send every user one targeted notification.
pub async fn idle(kind: Kind, programs: &Programs, sizes: &Sizes) -> anyhow::Result<Report> {
    let server = Server::start(kind, programs, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib();
    let kernel_before = KernelSockets::read();
    let n = sizes.connections;
    let (stop_tx, stop) = watch::channel(false);
    let servers = std::slice::from_ref(&server);
    let meter = Meter::start(servers, None);
    let (receivers, connects_per_s) = connect_and_receive(
        &[server.addr],
        sizes.transport,
        n,
        |i| format!("c{}", i % 10),
        &stop,
        |_| {},
    )
    .await?;
    let connecting = meter.read(servers, None);
    // Let the server settle, then read its memory.
    let hold = Duration::from_secs_f64(sizes.seconds.clamp(1.0, 30.0));
    wait_with_progress(Instant::now() + hold, || {
        format!(
            "  holding {n} connections, server RSS {} KiB",
            server.rss_kib()
        )
    })
    .await;
    let after = server.rss_kib();
    let kernel = KernelSockets::read();
    // The generator's socket ends are on this machine too and the same
    // kind of TCP socket: the server's ends are half of what was added.
    let server_ends_kib = |before: u64, after: u64| {
        after.saturating_sub(before) as f64 / 2.0 / 1024.0 / n.max(1) as f64
    };

    // Every socket still receives a targeted notification: poster p posts
    // to users p, p + posters, ...
    let posters = sizes.posters.clamp(1, n.max(1));
    let mut posting = JoinSet::new();
    for p in 0..posters {
        let mut poster = Poster::connect(server.addr).await?;
        posting.spawn(async move {
            let mut accepted = 0u64;
            for i in (p..n).step_by(posters) {
                if poster.post(body(&format!(r#""keycloak":"u{i}""#), 1)).await {
                    accepted += 1;
                }
            }
            accepted
        });
    }
    let mut accepted = 0;
    while let Some(count) = posting.join_next().await {
        accepted += count.expect("poster task");
    }
    tokio::time::sleep(DRAIN).await;
    let _ = stop_tx.send(true);
    let got = collect(receivers).await?;
    Ok(Report {
        connections: n,
        connects_per_s,
        rss_per_connection_kib: (after.saturating_sub(before)) as f64 / n as f64,
        kernel_buffers_per_connection_kib: server_ends_kib(kernel_before.buffers, kernel.buffers),
        kernel_structures_per_connection_kib: kernel_before
            .structures
            .zip(kernel.structures)
            .map(|(before, after)| server_ends_kib(before, after)),
        server_cpu_us_per_connect: connecting.us_each(connecting.servers, n as u64),
        notifies: accepted,
        expected: accepted,
        received: got.received,
        lost: accepted.saturating_sub(got.received),
        out_of_order: got.out_of_order,
        ..Report::new(
            match sizes.transport {
                Transport::Websocket => "idle",
                Transport::Polling => "idle-polling",
            },
            kind,
            got.latencies,
        )
    })
}

/// `connections` sockets in one channel; variant-1 notifications as fast as
/// the window allows (at most `window` not yet received by every socket),
/// or paced at `rate` per second.
pub async fn fanout(kind: Kind, programs: &Programs, sizes: &Sizes) -> anyhow::Result<Report> {
    let server = Server::start(kind, programs, None).await?;
    let n = sizes.connections;
    // How many sockets have received notification k, for the window.
    let counts: Arc<Vec<AtomicU64>> =
        Arc::new((0..=sizes.notifies).map(|_| AtomicU64::new(0)).collect());
    let complete = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let (receivers, connects_per_s) = {
        let (counts, complete) = (counts.clone(), complete.clone());
        let each = move |k: u64| {
            if let Some(c) = counts.get(k as usize)
                && c.fetch_add(1, Ordering::Relaxed) + 1 == n as u64
            {
                complete.fetch_add(1, Ordering::Relaxed);
            }
        };
        connect_and_receive(
            &[server.addr],
            sizes.transport,
            n,
            |_| "fan".into(),
            &stop,
            each,
        )
        .await?
    };
    let mut poster = Poster::connect(server.addr).await?;
    let servers = std::slice::from_ref(&server);
    let meter = Meter::start(servers, None);
    let started = meter.started;
    let deadline = started + Duration::from_secs_f64(sizes.seconds.max(1.0) * 6.0);
    let mut accepted = 0;
    let mut progress = Instant::now();
    for k in 1..=sizes.notifies {
        if progress.elapsed() > PROGRESS {
            eprintln!(
                "  posted {accepted}/{}, {} received by every socket",
                sizes.notifies,
                complete.load(Ordering::Relaxed)
            );
            progress = Instant::now();
        }
        // Wait for the window, bounded by the deadline.
        while k - 1 - complete.load(Ordering::Relaxed) >= sizes.window {
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        if Instant::now() > deadline {
            break;
        }
        if sizes.rate > 0.0 {
            let due = started + Duration::from_secs_f64((k - 1) as f64 / sizes.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if poster.post(body(r#""channel":"fan""#, k)).await {
            accepted += 1;
        }
    }
    // Until every accepted notification reached every socket, or the drain.
    let wait_until = Instant::now() + DRAIN;
    while complete.load(Ordering::Relaxed) < accepted && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cost = meter.read(servers, None);
    let _ = stop_tx.send(true);
    let got = collect(receivers).await?;
    let scenario = match sizes.transport {
        Transport::Websocket => "fanout",
        Transport::Polling => "fanout-polling",
    };
    Ok(channel_report(
        scenario,
        kind,
        n,
        connects_per_s,
        accepted,
        &cost,
        got,
    ))
}

/// The report of `accepted` notifications to one channel of `n` sockets
/// (fanout, flood): each socket should have received every one.
fn channel_report(
    scenario: &'static str,
    kind: Kind,
    n: usize,
    connects_per_s: f64,
    accepted: u64,
    cost: &Cost,
    got: Received,
) -> Report {
    let expected = accepted * n as u64;
    Report {
        connections: n,
        connects_per_s,
        notifies: accepted,
        notifies_per_s: accepted as f64 / cost.seconds,
        deliveries_per_s: got.received as f64 / cost.seconds,
        expected,
        received: got.received,
        lost: expected.saturating_sub(got.received),
        out_of_order: got.out_of_order,
        closed_by_server: got.closed,
        server_cpu_us_per_notify: cost.us_each(cost.servers, accepted),
        server_cores: cost.cores(cost.servers),
        generator_cores: cost.cores(cost.generator),
        seconds: cost.seconds,
        ..Report::new(scenario, kind, got.latencies)
    }
}

/// How long a storm's clients keep retrying before they count as lost.
const STORM_LIMIT: Duration = Duration::from_secs(60);
/// How long one connection attempt may take before it is given up and
/// retried: socket.io's client's `timeout` default.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a storm's clients come from, to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Through {
    /// A balancer that names each client in `X-Forwarded-For`, and channels
    /// set to read it (`CHANNELS_CLIENT_ADDRESS_HEADER`).
    ForwardingBalancer,
    /// A balancer's one address, channels not told about it.
    OneAddress,
}

/// A reconnect storm: `connections` clients connecting at once, as after a
/// node's restart behind a balancer, with channels' default per-address
/// connect limit (`CHANNELS_CONNECT_RATE`) on. A client refused, or not
/// connected within [`ATTEMPT_TIMEOUT`], tries again as socket.io's client
/// does (after 1 s, randomised by half), until [`STORM_LIMIT`]. Reports
/// the time until all were connected (as connects/s), server CPU per
/// connect, the failed attempts, and the clients still not connected at
/// the limit (`lost`).
pub async fn storm(
    kind: Kind,
    programs: &Programs,
    sizes: &Sizes,
    through: Through,
) -> anyhow::Result<Report> {
    let settings: &[(&str, &str)] = match through {
        Through::ForwardingBalancer => &[
            ("CHANNELS_CONNECT_RATE", "50:200"),
            ("CHANNELS_CLIENT_ADDRESS_HEADER", "x-forwarded-for"),
        ],
        Through::OneAddress => &[("CHANNELS_CONNECT_RATE", "50:200")],
    };
    let server = Server::start_with(kind, programs, None, settings).await?;
    let n = sizes.connections;
    let tokens = tokens();
    // The balancer's one address.
    let sources = Arc::new(Sources::one_address());
    let refused = Arc::new(AtomicU64::new(0));
    let servers = std::slice::from_ref(&server);
    let meter = Meter::start(servers, None);
    let started = meter.started;
    let until = started + STORM_LIMIT;
    let mut clients = JoinSet::new();
    for i in 0..n {
        let payload = auth(&tokens, i, &format!("c{}", i % 10));
        let (addr, sources, refused) = (server.addr, sources.clone(), refused.clone());
        let transport = sizes.transport;
        // Client i's own address, 10.0.0.0/8 in turn.
        let forwarded_for = (through == Through::ForwardingBalancer)
            .then(|| std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32)));
        clients.spawn(async move {
            // A cheap spread of retry delays, the same in every run.
            let mut jitter = i as u64 * 2_654_435_761 % 1000;
            loop {
                let attempt = Client::connect(addr, &sources, &payload, transport, forwarded_for);
                match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                    Ok(Ok(client)) => return Some((client, started.elapsed())),
                    Ok(Err(_)) | Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        let delay = Duration::from_millis(500 + jitter);
                        jitter = (jitter * 7 + 331) % 1000;
                        if Instant::now() + delay > until {
                            return None;
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut last = Duration::ZERO;
    let mut progress = Instant::now();
    while let Some(done) = clients.join_next().await {
        if let Some((client, at)) = done.expect("client task") {
            last = last.max(at);
            held.push(client);
        }
        if progress.elapsed() > PROGRESS {
            eprintln!("  connected {}/{n}", held.len());
            progress = Instant::now();
        }
    }
    let cost = meter.read(servers, None);
    let connected = held.len();
    drop(held);
    Ok(Report {
        connections: n,
        connects_per_s: connected as f64 / last.as_secs_f64().max(1e-9),
        server_cpu_us_per_connect: cost.us_each(cost.servers, connected as u64),
        refused: refused.load(Ordering::Relaxed),
        expected: n as u64,
        received: connected as u64,
        lost: (n - connected) as u64,
        seconds: last.as_secs_f64(),
        ..Report::new(
            match through {
                Through::ForwardingBalancer => "storm",
                Through::OneAddress => "storm-one-address",
            },
            kind,
            Latencies::new(),
        )
    })
}

/// How often [`flood`] samples the server's memory.
const RSS_SAMPLE: Duration = Duration::from_millis(100);

/// Memory under a flood: `connections` sockets in one channel, and
/// `posters` concurrent posters with no window for `seconds`, faster than
/// the clients read. The server's peak RSS, sampled every [`RSS_SAMPLE`]
/// from before the clients connected, per connection: what a server holds
/// for clients that fall behind, and whether it is bounded. Sockets the
/// server closed as slow are counted; their missed deliveries are `lost`.
/// Concurrent posters have no order between them, so order is not checked.
pub async fn flood(kind: Kind, programs: &Programs, sizes: &Sizes) -> anyhow::Result<Report> {
    let server = Server::start(kind, programs, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib();
    let n = sizes.connections;
    let (stop_tx, stop) = watch::channel(false);
    let (receivers, connects_per_s) = connect_and_receive(
        &[server.addr],
        sizes.transport,
        n,
        |_| "fan".into(),
        &stop,
        |_| {},
    )
    .await?;
    let idle = server.rss_kib();
    let servers = std::slice::from_ref(&server);
    let meter = Meter::start(servers, None);
    let until = meter.started + Duration::from_secs_f64(sizes.seconds.max(1.0));
    let sequence = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let mut posters = JoinSet::new();
    for _ in 0..sizes.posters.max(1) {
        let mut poster = Poster::connect(server.addr).await?;
        let (sequence, accepted) = (sequence.clone(), accepted.clone());
        posters.spawn(async move {
            while Instant::now() < until {
                let n = sequence.fetch_add(1, Ordering::Relaxed) + 1;
                if poster.post(body(r#""channel":"fan""#, n)).await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let mut peak = idle;
    let mut progress = Instant::now();
    // Through the posting and the drain: queues peak as the posters stop.
    while Instant::now() < until + DRAIN {
        peak = peak.max(server.rss_kib());
        if progress.elapsed() > PROGRESS {
            eprintln!(
                "  posted {}, server RSS {} KiB (peak {peak})",
                accepted.load(Ordering::Relaxed),
                server.rss_kib()
            );
            progress = Instant::now();
        }
        tokio::time::sleep(RSS_SAMPLE).await;
    }
    while let Some(done) = posters.join_next().await {
        done.expect("poster task");
    }
    let accepted = accepted.load(Ordering::Relaxed);
    let cost = meter.read(servers, None);
    let _ = stop_tx.send(true);
    let got = collect(receivers).await?;
    Ok(Report {
        rss_per_connection_kib: idle.saturating_sub(before) as f64 / n as f64,
        peak_rss_per_connection_kib: peak.saturating_sub(before) as f64 / n as f64,
        // Concurrent posters have no order between them.
        out_of_order: 0,
        ..channel_report("flood", kind, n, connects_per_s, accepted, &cost, got)
    })
}

/// `connections` users with one socket each; `posters` concurrent posters
/// of variants 2 and 3 for `seconds`. With `nodes` > 1, a cluster on a
/// private Redis: sockets and posters spread over the nodes. With a `batch`
/// above one, each call is a `/notify/batch` of that many notifications (to
/// the poster's users in turn), and the CPU is per notification.
pub async fn targeted(
    kind: Kind,
    programs: &Programs,
    sizes: &Sizes,
    nodes: usize,
    batch: usize,
) -> anyhow::Result<Report> {
    let redis = if nodes > 1 {
        Some(Redis::start(programs.pin).await?)
    } else {
        None
    };
    let mut servers = Vec::new();
    for _ in 0..nodes {
        servers.push(Server::start(kind, programs, redis.as_ref().map(|r| r.url.as_str())).await?);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let n = sizes.connections;
    let channel = |i: usize| format!("c{}", i % 10);
    let (stop_tx, stop) = watch::channel(false);
    let (receivers, connects_per_s) =
        connect_and_receive(&addrs, sizes.transport, n, channel, &stop, |_| {}).await?;

    let mut posters = JoinSet::new();
    let mut connected = Vec::new();
    for p in 0..sizes.posters.min(n) {
        connected.push(Poster::connect(addrs[p % addrs.len()]).await?);
    }
    // CPU is counted from here, as the rate: over the posting alone.
    let meter = Meter::start(&servers, redis.as_ref());
    let until = meter.started + Duration::from_secs_f64(sizes.seconds);
    // Notifications accepted so far, by all posters: the progress lines'
    // count and, once they are done, the run's.
    let accepted = Arc::new(AtomicU64::new(0));
    for (p, mut poster) in connected.into_iter().enumerate() {
        let accepted = accepted.clone();
        // Poster p owns users p, p + posters, ...: one poster per user keeps
        // each user's sequence numbers in order.
        let users: Vec<usize> = (p..n).step_by(sizes.posters).collect();
        posters.spawn(async move {
            let mut sequence = vec![0u64; users.len()];
            let mut k = 0usize;
            while Instant::now() < until {
                let mut items = Vec::with_capacity(batch);
                for _ in 0..batch {
                    let slot = k % users.len();
                    let user = users[slot];
                    sequence[slot] += 1;
                    let target = if k.is_multiple_of(2) {
                        format!(r#""keycloak":"u{user}""#)
                    } else {
                        format!(r#""keycloak":"u{user}","channel":"{}""#, channel(user))
                    };
                    items.push(body(&target, sequence[slot]));
                    k += 1;
                }
                // A refused call is not retried: its numbers are gaps, not
                // reorderings.
                let posted = if batch == 1 {
                    poster.post(items.pop().expect("one item")).await
                } else {
                    let batch = format!(r#"{{"notifications":[{}]}}"#, items.join(","));
                    poster.post_to("/notify/batch", batch).await
                };
                if posted {
                    accepted.fetch_add(items.len().max(1) as u64, Ordering::Relaxed);
                }
            }
        });
    }
    wait_with_progress(until, || {
        format!("  posted {} notifies", accepted.load(Ordering::Relaxed))
    })
    .await;
    while let Some(done) = posters.join_next().await {
        done.expect("poster task");
    }
    let accepted = accepted.load(Ordering::Relaxed);
    let cost = meter.read(&servers, redis.as_ref());
    tokio::time::sleep(DRAIN).await;
    let _ = stop_tx.send(true);
    let got = collect(receivers).await?;
    Ok(Report {
        connections: n,
        nodes,
        connects_per_s,
        notifies: accepted,
        notifies_per_s: accepted as f64 / cost.seconds,
        deliveries_per_s: got.received as f64 / cost.seconds,
        expected: accepted,
        received: got.received,
        lost: accepted.saturating_sub(got.received),
        out_of_order: got.out_of_order,
        server_cpu_us_per_notify: cost.us_each(cost.servers, accepted),
        redis_cpu_us_per_notify: redis.as_ref().map(|_| cost.us_each(cost.redis, accepted)),
        server_cores: cost.cores(cost.servers),
        generator_cores: cost.cores(cost.generator),
        seconds: cost.seconds,
        ..Report::new(
            match (nodes > 1, batch > 1) {
                (_, true) => "batch",
                (true, false) => "cluster",
                (false, false) => "targeted",
            },
            kind,
            got.latencies,
        )
    })
}

/// Presence: `connections` users with one socket each over two nodes and a
/// private Redis, then `posters` concurrent callers of `GET
/// /presence?keycloak=` (users in turn, spread over both nodes) for
/// `seconds`: answers per second, their latency, and server CPU (both
/// nodes) per answer. Every answer must say the user is online, on a
/// complete count (channels only: the Node baseline has no presence).
pub async fn presence(kind: Kind, programs: &Programs, sizes: &Sizes) -> anyhow::Result<Report> {
    anyhow::ensure!(kind.is_channels(), "presence is a channels endpoint");
    let redis = Redis::start(programs.pin).await?;
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(Server::start(kind, programs, Some(&redis.url)).await?);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let n = sizes.connections;
    let (stop_tx, stop) = watch::channel(false);
    let (receivers, connects_per_s) = connect_and_receive(
        &addrs,
        sizes.transport,
        n,
        |i| format!("c{}", i % 10),
        &stop,
        |_| {},
    )
    .await?;
    let mut callers = JoinSet::new();
    let meter = Meter::start(&servers, Some(&redis));
    let until = meter.started + Duration::from_secs_f64(sizes.seconds);
    for p in 0..sizes.posters {
        let mut caller = Poster::connect(addrs[p % addrs.len()]).await?;
        let posters = sizes.posters;
        callers.spawn(async move {
            let (mut latencies, mut answered, mut refused) = (Latencies::new(), 0u64, 0u64);
            let mut user = p;
            while Instant::now() < until {
                let sent = Instant::now();
                let answer = caller
                    .get(&format!("/presence?keycloak=u{}", user % n))
                    .await;
                let online = answer
                    .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
                    .is_some_and(|a| a["online"] == true && a["complete"] == true);
                if online {
                    latencies.record(sent.elapsed().as_micros() as u64);
                    answered += 1;
                } else {
                    refused += 1;
                }
                user += posters;
            }
            (latencies, answered, refused)
        });
    }
    let (mut latencies, mut answered, mut refused) = (Latencies::new(), 0, 0);
    while let Some(done) = callers.join_next().await {
        let (l, a, r) = done.expect("caller task");
        latencies.merge(&l);
        answered += a;
        refused += r;
    }
    let cost = meter.read(&servers, Some(&redis));
    let _ = stop_tx.send(true);
    collect(receivers).await?;
    Ok(Report {
        connections: n,
        nodes: 2,
        connects_per_s,
        notifies: answered,
        notifies_per_s: answered as f64 / cost.seconds,
        expected: answered + refused,
        received: answered,
        lost: refused,
        server_cpu_us_per_notify: cost.us_each(cost.servers, answered),
        redis_cpu_us_per_notify: Some(cost.us_each(cost.redis, answered)),
        server_cores: cost.cores(cost.servers),
        generator_cores: cost.cores(cost.generator),
        seconds: cost.seconds,
        ..Report::new("presence", kind, latencies)
    })
}

/// Sleeps until `until`, printing `line()` every [`PROGRESS`] on the way.
async fn wait_with_progress(until: Instant, line: impl Fn() -> String) {
    loop {
        let next = Instant::now() + PROGRESS;
        if next >= until {
            tokio::time::sleep_until(until.into()).await;
            return;
        }
        tokio::time::sleep_until(next.into()).await;
        eprintln!("{}", line());
    }
}

/// The wall time and CPU of a run's measured phase, from
/// [`Meter::start`]: the servers' (all nodes), Redis', and the generator's,
/// which shares the machine with them (a run whose servers and generator
/// together keep every core busy is bound by the machine).
struct Meter {
    started: Instant,
    servers: u64,
    redis: u64,
    generator: u64,
}

/// What [`Meter::read`] found: wall seconds, and CPU clock ticks.
struct Cost {
    seconds: f64,
    servers: u64,
    redis: u64,
    generator: u64,
}

impl Meter {
    fn start(servers: &[Server], redis: Option<&Redis>) -> Self {
        Self {
            servers: servers.iter().map(Server::cpu_ticks).sum(),
            redis: redis.map_or(0, Redis::cpu_ticks),
            generator: generator_cpu_ticks(),
            started: Instant::now(),
        }
    }

    fn read(&self, servers: &[Server], redis: Option<&Redis>) -> Cost {
        Cost {
            seconds: self.started.elapsed().as_secs_f64(),
            servers: servers.iter().map(Server::cpu_ticks).sum::<u64>() - self.servers,
            redis: redis.map_or(0, Redis::cpu_ticks) - self.redis,
            generator: generator_cpu_ticks() - self.generator,
        }
    }
}

impl Cost {
    /// CPU `ticks` per one of `count` things, in microseconds.
    fn us_each(&self, ticks: u64, count: u64) -> f64 {
        ticks as f64 / TICKS_PER_SECOND * 1e6 / count.max(1) as f64
    }

    /// CPU `ticks` over the wall time, in cores.
    fn cores(&self, ticks: u64) -> f64 {
        ticks as f64 / TICKS_PER_SECOND / self.seconds.max(1e-9)
    }
}

/// Replays timed, one after another.
const REPLAYS: usize = 5;

/// Replay speed: one socket on a node over a private Redis receives one
/// notification, drops, misses `notifies` more (posted to its user), and
/// reconnects with its pid and that offset; the time from the start of the
/// reconnect to the last replayed notification, [`REPLAYS`] times (p50 and
/// max of those). Every replay must be recovered and exact.
pub async fn replay(kind: Kind, programs: &Programs, sizes: &Sizes) -> anyhow::Result<Report> {
    let redis = Redis::start(programs.pin).await?;
    let server = Server::start(kind, programs, Some(&redis.url)).await?;
    let sources = Sources::new();
    let tokens = tokens();
    let mut poster = Poster::connect(server.addr).await?;
    let missed = sizes.notifies;
    let mut times = Latencies::new();
    let (mut lost, mut out_of_order) = (0, 0);
    for i in 0..REPLAYS {
        let fresh = auth(&tokens, i, "c0");
        let mut client =
            Client::connect(server.addr, &sources, &fresh, Transport::Websocket, None).await?;
        let pid = client
            .pid
            .clone()
            .context("no pid in the CONNECT acknowledgement: recovery is off")?;
        let target = format!(r#""keycloak":"u{i}""#);
        anyhow::ensure!(poster.post(body(&target, 0)).await, "notify refused");
        let offset = tokio::time::timeout(Duration::from_secs(5), client.next_with_offset())
            .await
            .ok()
            .flatten()
            .and_then(|(_, offset)| offset)
            .context("no offset on the first notification")?;
        client.close().await;
        // The node sees the close and records the session's end.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for n in 1..=missed {
            anyhow::ensure!(poster.post(body(&target, n)).await, "notify refused");
        }
        let mut returning: serde_json::Value = serde_json::from_str(&fresh)?;
        returning["pid"] = json!(pid);
        returning["offset"] = json!(offset);
        let started = Instant::now();
        let mut client = Client::connect(
            server.addr,
            &sources,
            &returning.to_string(),
            Transport::Websocket,
            None,
        )
        .await?;
        anyhow::ensure!(client.pid.as_deref() == Some(pid.as_str()), "not recovered");
        let mut expected = 1;
        while expected <= missed {
            let next =
                tokio::time::timeout(Duration::from_secs(10), client.next_with_offset()).await;
            let Ok(Some((stamp, _))) = next else { break };
            if stamp.n != expected {
                out_of_order += 1;
            }
            expected = stamp.n + 1;
        }
        times.record(started.elapsed().as_micros() as u64);
        lost += (missed + 1).saturating_sub(expected);
        client.close().await;
    }
    Ok(Report {
        connections: REPLAYS,
        nodes: 1,
        notifies: missed,
        expected: missed * REPLAYS as u64,
        lost,
        out_of_order,
        ..Report::new("replay", kind, times)
    })
}
