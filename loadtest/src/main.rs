//! `loadtest`: the load generator and the side-by-side benchmark of channels
//! against the Node baseline (docs/testing.md, "Benchmarks", and BENCHMARKS.md).
//!
//! `loadtest run <scenario> --server channels|node` runs one scenario;
//! `loadtest compare` runs every scenario against both servers, alternating
//! them round by round, and prints a table of medians and ratios.

mod chaos;
mod client;
mod poster;
mod report;
mod scenarios;
mod servers;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    client::Transport,
    report::{Report, median},
    scenarios::{Sizes, Through},
    servers::{Kind, Programs},
};

#[derive(Parser)]
#[command(about = "Load generator and benchmark for channels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The channels binary (build it with `cargo build --release`).
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/channels"))]
    channels_bin: PathBuf,
    /// channels' worker threads (`CHANNELS_WORKER_THREADS`). One by default:
    /// the generator takes most of a core of this machine's two, and Node's
    /// baseline runs on one thread (BENCHMARKS.md, "One worker thread").
    #[arg(long, global = true, default_value_t = 1)]
    channels_workers: usize,
    /// Pins the servers (and Redis) to CPU 0 and the generator to CPU 1, so
    /// neither takes the other's core (`sched_setaffinity`).
    #[arg(long, global = true)]
    pin: bool,
    /// The Node baseline's folder (`npm ci` runs there when needed).
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/baseline/node"))]
    node_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one scenario against one server.
    Run {
        scenario: Scenario,
        #[arg(long, value_enum, default_value_t = Kind::Channels)]
        server: Kind,
        #[command(flatten)]
        sizes: Sizes,
    },
    /// Runs every scenario against both servers and prints the comparison.
    Compare {
        /// Rounds per scenario; each round runs both servers, in turn first.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Connections of the idle scenario (the others use 2,000).
        #[arg(long, default_value_t = 18_000)]
        idle_connections: usize,
        /// Small numbers, seconds per scenario: a smoke run, not a benchmark.
        #[arg(long)]
        quick: bool,
        /// Only these scenarios (default: all).
        #[arg(long, value_enum)]
        only: Vec<Scenario>,
        /// The server whose ratio the table shows ...
        #[arg(long, value_enum, default_value_t = Kind::Channels)]
        ours: Kind,
        /// ... to this one's (`channels-no-recovery`: the cost of recovery;
        /// `node-recovery`: the anchor with socket.io's recovery on).
        #[arg(long, value_enum, default_value_t = Kind::Node)]
        theirs: Kind,
    },
}

/// Notifications per call of the batch scenario (issue 17's benchmark).
const BATCH: usize = 100;

/// One number the comparison table shows of a report.
type Measure = fn(&Report) -> f64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Fanout,
    /// Idle, with long-polling clients (`--idle-connections` / 4 of them:
    /// each holds two connections of the generator's descriptors).
    IdlePolling,
    /// Fanout, with long-polling clients.
    FanoutPolling,
    Targeted,
    Cluster,
    /// Recovery: a socket that missed `--notifies` gets them on return.
    Replay,
    /// The rolling-restart drill: about `--connections` clients over three
    /// nodes restarted in turn, then one SIGKILLed (channels only).
    Chaos,
    /// Targeted, posted as `/notify/batch` calls of 100 notifications.
    Batch,
    /// Fanout with `--posters` concurrent posters and no window: the
    /// server's peak memory while clients fall behind.
    Flood,
    /// Every client connecting at once through a balancer that names them
    /// in `X-Forwarded-For` (channels: `CHANNELS_CLIENT_ADDRESS_HEADER`),
    /// with channels' default per-address connect limit.
    Storm,
    /// The same storm with channels not told of the header: every client is
    /// the balancer's one address to the connect limit.
    StormOneAddress,
    /// `GET /presence` on two nodes with `--connections` users online
    /// (channels only).
    Presence,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::Idle,
        Scenario::Fanout,
        Scenario::Targeted,
        Scenario::Cluster,
    ];

    async fn run(self, kind: Kind, programs: &Programs, sizes: &Sizes) -> anyhow::Result<Report> {
        match self {
            Scenario::Idle | Scenario::IdlePolling => scenarios::idle(kind, programs, sizes).await,
            Scenario::Fanout | Scenario::FanoutPolling => {
                scenarios::fanout(kind, programs, sizes).await
            }
            Scenario::Targeted => scenarios::targeted(kind, programs, sizes, 1, 1).await,
            Scenario::Cluster => scenarios::targeted(kind, programs, sizes, 2, 1).await,
            Scenario::Batch => scenarios::targeted(kind, programs, sizes, 1, BATCH).await,
            Scenario::Replay => scenarios::replay(kind, programs, sizes).await,
            Scenario::Chaos => chaos::chaos(kind, programs, sizes).await,
            Scenario::Presence => scenarios::presence(kind, programs, sizes).await,
            Scenario::Flood => scenarios::flood(kind, programs, sizes).await,
            Scenario::Storm => {
                scenarios::storm(kind, programs, sizes, Through::ForwardingBalancer).await
            }
            Scenario::StormOneAddress => {
                scenarios::storm(kind, programs, sizes, Through::OneAddress).await
            }
        }
    }

    /// The sizes `compare` uses.
    fn sizes(self, quick: bool, idle_connections: usize) -> Sizes {
        let connections = match (self, quick) {
            (_, true) => 50,
            (Scenario::Idle | Scenario::Storm | Scenario::StormOneAddress, false) => {
                idle_connections
            }
            (Scenario::IdlePolling, false) => idle_connections / 4,
            // The drill's 300 official clients, in one Node process.
            (Scenario::Chaos, false) => 300,
            _ => 2000,
        };
        Sizes {
            connections,
            posters: match (self, quick) {
                (_, true) | (Scenario::Flood, false) => 4,
                _ => 32,
            },
            seconds: if quick { 1.0 } else { 10.0 },
            notifies: match (self, quick) {
                (_, true) => 50,
                // channels' default CHANNELS_RECOVERY_MAX_MISSED.
                (Scenario::Replay, false) => 1000,
                _ => 2000,
            },
            window: 16,
            rate: 0.0,
            transport: match self {
                Scenario::IdlePolling | Scenario::FanoutPolling => Transport::Polling,
                _ => Transport::Websocket,
            },
        }
    }

    /// What the comparison table shows of this scenario.
    fn headline(self) -> Vec<(&'static str, Measure)> {
        match self {
            Scenario::Idle | Scenario::IdlePolling => vec![
                ("RSS per connection, KiB", |r| r.rss_per_connection_kib),
                ("kernel socket buffers per connection, KiB", |r| {
                    r.kernel_buffers_per_connection_kib
                }),
                ("kernel socket structures per connection, KiB", |r| {
                    r.kernel_structures_per_connection_kib.unwrap_or(0.0)
                }),
                ("connects/s", |r| r.connects_per_s),
                ("server CPU µs per connect", |r| {
                    r.server_cpu_us_per_connect
                }),
                ("lost at the final notify", |r| r.lost as f64),
            ],
            Scenario::Fanout | Scenario::FanoutPolling => vec![
                ("deliveries/s", |r| r.deliveries_per_s),
                ("p99 ms", |r| r.p99_ms),
                ("server CPU µs per notify", |r| r.server_cpu_us_per_notify),
                ("cores busy: server", |r| r.server_cores),
                ("cores busy: generator", |r| r.generator_cores),
            ],
            Scenario::Flood => vec![
                ("peak RSS per connection, KiB", |r| {
                    r.peak_rss_per_connection_kib
                }),
                ("deliveries/s", |r| r.deliveries_per_s),
                ("sockets closed as slow", |r| r.closed_by_server as f64),
                ("server CPU µs per notify", |r| r.server_cpu_us_per_notify),
            ],
            Scenario::Storm | Scenario::StormOneAddress => vec![
                ("seconds until all connected", |r| r.seconds),
                ("server CPU µs per connect", |r| {
                    r.server_cpu_us_per_connect
                }),
                ("attempts refused or timed out", |r| r.refused as f64),
                ("not connected after 60 s", |r| r.lost as f64),
            ],
            Scenario::Chaos => vec![
                ("deliveries expected", |r| r.expected as f64),
                ("lost", |r| r.lost as f64),
                ("out of order", |r| r.out_of_order as f64),
            ],
            Scenario::Presence => vec![
                ("answers/s", |r| r.notifies_per_s),
                ("p99 ms", |r| r.p99_ms),
                ("server CPU µs per answer", |r| r.server_cpu_us_per_notify),
                ("Redis CPU µs per answer", |r| {
                    r.redis_cpu_us_per_notify.unwrap_or(0.0)
                }),
                ("refused or not online", |r| r.lost as f64),
            ],
            Scenario::Replay => vec![
                ("replay p50 ms", |r| r.p50_ms),
                ("replay max ms", |r| r.max_ms),
                ("lost", |r| r.lost as f64),
                ("out of order", |r| r.out_of_order as f64),
            ],
            Scenario::Targeted | Scenario::Cluster | Scenario::Batch => {
                let mut rows: Vec<(&'static str, Measure)> = vec![
                    ("notifies/s", |r| r.notifies_per_s),
                    ("p99 ms", |r| r.p99_ms),
                    ("server CPU µs per notify", |r| r.server_cpu_us_per_notify),
                    ("lost", |r| r.lost as f64),
                    ("out of order", |r| r.out_of_order as f64),
                    ("cores busy: server", |r| r.server_cores),
                    ("cores busy: generator", |r| r.generator_cores),
                ];
                // Only a cluster has a Redis, beside its servers' CPU.
                if self == Scenario::Cluster {
                    rows.insert(
                        3,
                        ("Redis CPU µs per notify", |r| {
                            r.redis_cpu_us_per_notify.unwrap_or(0.0)
                        }),
                    );
                }
                rows
            }
        }
    }
}

/// One worker thread, besides the main thread that runs the scenario
/// itself (fanout's poster, `compare`'s rounds): the generator shares the
/// machine's two cores with the server it measures, so it keeps to few
/// threads. Its thread count moved nothing beyond this machine's noise
/// (fanout against channels on two threads: 140,000 / 169,000 deliveries/s
/// with a worker per core, 117,000-140,000 with one, 117,000-130,000 with
/// none); the server's own did (BENCHMARKS.md, "One worker thread").
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.pin {
        // Before the runtime starts: its threads inherit the mask.
        servers::pin_current_thread(servers::GENERATOR_CPU)
            .context("pinning the generator (--pin needs two CPUs)")?;
        eprintln!(
            "  generator on CPUs {}",
            servers::allowed_cpus(std::process::id())
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let programs = Programs {
        channels: cli.channels_bin,
        channels_workers: cli.channels_workers,
        node_dir: cli.node_dir,
        pin: cli.pin,
    };
    match cli.command {
        Command::Run {
            scenario,
            server,
            sizes,
        } => {
            prepare(&programs, &[server]).await?;
            scenario.run(server, &programs, &sizes).await?.print();
        }
        Command::Compare {
            rounds,
            idle_connections,
            quick,
            only,
            ours,
            theirs,
        } => {
            prepare(&programs, &[ours, theirs]).await?;
            let scenarios = if only.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                only
            };
            let mut table = Vec::new();
            for scenario in scenarios {
                let sizes = scenario.sizes(quick, idle_connections);
                let mut reports: Vec<(Kind, Report)> = Vec::new();
                for round in 0..rounds {
                    let order = if round % 2 == 0 {
                        [ours, theirs]
                    } else {
                        [theirs, ours]
                    };
                    for kind in order {
                        eprintln!(
                            "{scenario:?} round {} / {rounds}: {}",
                            round + 1,
                            kind.name()
                        );
                        let report = scenario.run(kind, &programs, &sizes).await?;
                        report.print();
                        reports.push((kind, report));
                    }
                }
                table.push((scenario, reports));
            }
            print_table(&table, ours, theirs);
        }
    }
    Ok(())
}

/// Checks the programs exist; installs the Node baseline's packages.
async fn prepare(programs: &Programs, kinds: &[Kind]) -> anyhow::Result<()> {
    if kinds.iter().any(|k| k.is_channels()) && !programs.channels.exists() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release` (or pass --channels-bin)",
            programs.channels.display()
        );
    }
    if kinds.iter().any(|k| !k.is_channels()) && !programs.node_dir.join("node_modules").exists() {
        let status = tokio::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&programs.node_dir)
            .status()
            .await
            .context("running npm ci for the Node baseline")?;
        anyhow::ensure!(
            status.success(),
            "npm ci failed in {}",
            programs.node_dir.display()
        );
    }
    Ok(())
}

/// Medians per server and their ratio, ours to theirs.
fn print_table(table: &[(Scenario, Vec<(Kind, Report)>)], ours: Kind, theirs: Kind) {
    let (a, b) = (ours.name(), theirs.name());
    println!();
    println!("| scenario | measure | {a} | {b} | {a} ÷ {b} |");
    println!("|---|---|---|---|---|");
    for (scenario, reports) in table {
        for (label, value) in scenario.headline() {
            let of = |kind: Kind| {
                median(
                    reports
                        .iter()
                        .filter(|(k, _)| *k == kind)
                        .map(|(_, r)| value(r))
                        .collect(),
                )
            };
            let (x, y) = (of(ours), of(theirs));
            let ratio = if y > 0.0 {
                format!("{:.2}", x / y)
            } else {
                "-".into()
            };
            println!(
                "| {} | {label} | {x:.2} | {y:.2} | {ratio} |",
                scenario
                    .to_possible_value()
                    .expect("no skipped scenarios")
                    .get_name()
            );
        }
    }
}
