//! A private `redis-server` per test, on a free loopback port, that the test
//! can kill and restart (never the machine's shared 6379).

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Extra arguments (cluster mode), kept for restarts.
    args: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self::start_with(free_port(), Vec::new())
    }

    fn start_with(port: u16, args: Vec<String>) -> Self {
        super::tools::require("redis-server", "redis-server");
        super::tools::require("redis-cli", "redis-tools");
        let mut server = RedisServer {
            port,
            child: None,
            args,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port, and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: an outage, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs a command with redis-cli; its trimmed output, or `None` on failure.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Whether this cluster master serves `slot` (its own line of
    /// `CLUSTER NODES` lists its slot ranges after the 8th field).
    pub fn owns(&self, slot: u16) -> bool {
        let nodes = self.cli(&["CLUSTER", "NODES"]).unwrap_or_default();
        let Some(mine) = nodes.lines().find(|l| l.contains("myself")) else {
            return false;
        };
        mine.split_whitespace().skip(8).any(|range| {
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            match (from.parse::<u16>(), to.parse::<u16>()) {
                (Ok(from), Ok(to)) => (from..=to).contains(&slot),
                _ => false,
            }
        })
    }

    /// Subscribers of a pub/sub channel (`PUBSUB NUMSUB`).
    pub fn numsub(&self, topic: &str) -> i64 {
        let out = self.cli(&["PUBSUB", "NUMSUB", topic]).unwrap_or_default();
        out.lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(-1)
    }
}

/// A free loopback port whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A Redis Cluster of three masters (no replicas), built with
/// `redis-cli --cluster create` from private redis-server processes.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    pub fn start() -> Self {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let dir = std::env::temp_dir().join(format!("channels-redis-cluster-{}", ports[0]));
        std::fs::create_dir_all(&dir).unwrap();
        let masters: Vec<RedisServer> = ports
            .iter()
            .map(|port| {
                let conf = dir.join(format!("nodes-{port}.conf"));
                let args = vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    conf.display().to_string(),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                ];
                RedisServer::start_with(*port, args)
            })
            .collect();
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { masters, dir };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every master reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for master in &self.masters {
            while !master
                .cli(&["CLUSTER", "INFO"])
                .unwrap_or_default()
                .contains("cluster_state:ok")
            {
                assert!(Instant::now() < deadline, "cluster did not reach state ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `CHANNELS_REDIS_URL` for this cluster: every master as a seed.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.masters.iter().map(RedisServer::url).collect();
        urls.join(",")
    }

    /// The ports of the masters owning the slots of these keys or topics.
    pub fn masters_holding(&self, names: &[impl AsRef<str>]) -> std::collections::BTreeSet<u16> {
        let slot_owner = |slot: u16| {
            self.masters
                .iter()
                .find(|m| m.owns(slot))
                .map(|m| m.port)
                .expect("every slot has a master")
        };
        names
            .iter()
            .map(|name| {
                let out = self.masters[0]
                    .cli(&["CLUSTER", "KEYSLOT", name.as_ref()])
                    .expect("CLUSTER KEYSLOT answers");
                slot_owner(out.trim().parse().expect("a slot number"))
            })
            .collect()
    }

    /// Every key, over the masters.
    pub fn keys(&self) -> Vec<String> {
        self.masters
            .iter()
            .map(|m| {
                m.cli(&["--scan"])
                    .unwrap_or_else(|| panic!("cannot scan the master on port {}", m.port))
            })
            .flat_map(|out| out.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// Subscribers of a sharded channel, summed over the masters.
    pub fn shard_numsub(&self, topic: &str) -> i64 {
        self.masters
            .iter()
            .filter_map(|m| m.cli(&["PUBSUB", "SHARDNUMSUB", topic]))
            .filter_map(|out| {
                out.lines()
                    .nth(1)
                    .and_then(|n| n.trim().parse::<i64>().ok())
            })
            .sum()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for master in &mut self.masters {
            master.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
