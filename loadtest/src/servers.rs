//! The servers under test, each run as its own process so its memory and
//! CPU can be read from `/proc`: the channels binary, the Node baseline
//! (`loadtest/baseline/node`), and a private `redis-server` for clusters.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// The benchmarks' shared secrets: public, loopback only.
pub const WS_SECRET: &str = "loadtest-ws-token-secret-0123456789abcdef";
pub const API_KEY: &str = "loadtest-api-key";
const UPSTREAM_SECRET: &str = "loadtest-upstream-secret-0123456789abcdef";

/// Which server a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// channels as configured by default: connection state recovery on.
    Channels,
    /// channels with `CHANNELS_RECOVERY_WINDOW=0`.
    ChannelsNoRecovery,
    /// Node's socket.io, the official Redis adapter for a cluster.
    Node,
    /// Node's socket.io with `connectionStateRecovery`, the redis-streams
    /// adapter for a cluster.
    NodeRecovery,
}

impl Kind {
    pub fn is_channels(self) -> bool {
        matches!(self, Kind::Channels | Kind::ChannelsNoRecovery)
    }

    /// The name `--server` and the tables use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Channels => "channels",
            Kind::ChannelsNoRecovery => "channels-no-recovery",
            Kind::Node => "node",
            Kind::NodeRecovery => "node-recovery",
        }
    }
}

/// Where the servers' programs are, and how channels runs.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The `channels` binary (a release build for benchmarks).
    pub channels: PathBuf,
    /// Its worker threads.
    pub channels_workers: usize,
    /// The Node baseline's folder, with its `node_modules` installed.
    pub node_dir: PathBuf,
    /// `--pin`: servers and Redis on [`SERVER_CPU`], the generator on the
    /// other (`main`).
    pub pin: bool,
}

/// The CPU the servers (and Redis) run on with `--pin`.
pub const SERVER_CPU: usize = 0;
/// The CPU the generator runs on with `--pin`.
pub const GENERATOR_CPU: usize = 1;

/// Restricts the calling thread, and the threads and processes it starts
/// from then on, to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it,
    // and sched_setaffinity reads exactly its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes `command`'s process run on [`SERVER_CPU`] only.
fn pin_to_server_cpu(command: &mut Command) {
    // SAFETY: between fork and exec the closure calls only
    // sched_setaffinity (async-signal-safe) on a set built on its stack.
    unsafe {
        command.pre_exec(|| pin_current_thread(SERVER_CPU));
    }
}

/// A running server process, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts one node of `kind`; with `redis`, as a cluster node on it.
    pub async fn start(
        kind: Kind,
        programs: &Programs,
        redis: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_with(kind, programs, redis, &[]).await
    }

    /// [`Server::start`], with channels' `settings` over the benchmark's
    /// (the Node baseline has none of them).
    pub async fn start_with(
        kind: Kind,
        programs: &Programs,
        redis: Option<&str>,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut command = match kind {
            Kind::Channels | Kind::ChannelsNoRecovery => {
                let mut c = Command::new(&programs.channels);
                c.arg("serve").envs([
                    ("CHANNELS_LISTEN", addr.to_string().as_str()),
                    ("CHANNELS_AUTH_HS256_SECRET", UPSTREAM_SECRET),
                    ("CHANNELS_WS_TOKEN_SECRET", WS_SECRET),
                    ("CHANNELS_API_KEYS", API_KEY),
                    ("CHANNELS_LOG", "warn"),
                    // The generator is one client address far beyond any
                    // real client's rate.
                    ("CHANNELS_CONNECT_RATE", "off"),
                    ("CHANNELS_AUTHORIZE_RATE", "off"),
                    ("CHANNELS_NOTIFY_RATE_PER_KEY", "off"),
                    ("CHANNELS_NOTIFY_RATE_PER_ADDRESS", "off"),
                ]);
                c.env(
                    "CHANNELS_WORKER_THREADS",
                    programs.channels_workers.to_string(),
                );
                if let Some(url) = redis {
                    c.env("CHANNELS_REDIS_URL", url);
                }
                if kind == Kind::ChannelsNoRecovery {
                    c.env("CHANNELS_RECOVERY_WINDOW", "0");
                }
                c.envs(settings.iter().copied());
                c
            }
            Kind::Node | Kind::NodeRecovery => {
                let mut c = Command::new("node");
                c.arg("server.js").current_dir(&programs.node_dir).envs([
                    ("PORT", port.to_string().as_str()),
                    ("WS_SECRET", WS_SECRET),
                    ("API_KEY", API_KEY),
                ]);
                if let Some(url) = redis {
                    c.env("REDIS_URL", url);
                }
                if kind == Kind::NodeRecovery {
                    c.env("RECOVERY", "1");
                }
                c
            }
        };
        if programs.pin {
            pin_to_server_cpu(&mut command);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {kind:?} server"))?;
        let server = Server { child, addr };
        if programs.pin {
            let pid = server.child.id().expect("running");
            eprintln!("  {} server on CPUs {}", kind.name(), allowed_cpus(pid));
        }
        server.wait_healthy().await?;
        Ok(server)
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("http://{}/healthz", self.addr);
        for _ in 0..200 {
            if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("server at {} did not become healthy", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status(self.pid(), "VmRSS:")
    }

    /// CPU time used so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid())
    }
}

/// A private `redis-server` on a free loopback port, killed when dropped.
pub struct Redis {
    child: Child,
    pub url: String,
}

impl Redis {
    /// A private redis-server, on the servers' CPU when `pin`.
    pub async fn start(pin: bool) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut command = Command::new("redis-server");
        if pin {
            pin_to_server_cpu(&mut command);
        }
        let child = command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Redis {
                    child,
                    url: format!("redis://127.0.0.1:{port}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not start")
    }

    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.child.id().expect("running"))
    }
}

/// The CPUs process `pid` may run on, as the kernel lists them.
pub fn allowed_cpus(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time the generator itself (this process) used so far, in clock
/// ticks: it shares the machine with the servers, so a run whose servers
/// and generator together keep every core busy is bound by the machine.
pub fn generator_cpu_ticks() -> u64 {
    cpu_ticks(std::process::id())
}

/// utime + stime of `pid` and its threads, from `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat(5); 12 and 13 after ')'.
    field(11) + field(12)
}

/// Clock ticks per second of `/proc` CPU times (Linux: always 100 here).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// The kernel's memory for TCP sockets, machine-wide, in bytes: neither
/// part is in a process's RSS, and both count every socket end, the
/// generator's too.
#[derive(Clone, Copy)]
pub struct KernelSockets {
    /// Pages of socket buffers (`mem` of `/proc/net/sockstat`'s `TCP:`
    /// line): what sockets hold queued.
    pub buffers: u64,
    /// The slab objects of the sockets themselves (`TCP` and
    /// `sock_inode_cache` of `/proc/slabinfo`, active objects times object
    /// size), or `None` where slabinfo is readable by root only.
    pub structures: Option<u64>,
}

impl KernelSockets {
    pub fn read() -> Self {
        const PAGE: u64 = 4096;
        let buffers = std::fs::read_to_string("/proc/net/sockstat")
            .ok()
            .and_then(|s| {
                let tcp = s.lines().find(|l| l.starts_with("TCP:"))?;
                let mut fields = tcp.split_whitespace();
                fields.find(|f| *f == "mem")?;
                fields.next()?.parse::<u64>().ok()
            })
            .unwrap_or(0)
            * PAGE;
        // slabinfo(5): name, active objects, all objects, object size, …
        let structures = std::fs::read_to_string("/proc/slabinfo").ok().map(|s| {
            s.lines()
                .filter_map(|l| {
                    let mut fields = l.split_whitespace();
                    let name = fields.next()?;
                    if name != "TCP" && name != "sock_inode_cache" {
                        return None;
                    }
                    let active: u64 = fields.next()?.parse().ok()?;
                    let size: u64 = fields.nth(1)?.parse().ok()?;
                    Some(active * size)
                })
                .sum()
        });
        Self {
            buffers,
            structures,
        }
    }
}
