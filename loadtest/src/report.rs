//! What a run reports: one [`Report`] per scenario and server, printed as a
//! human line and a machine-readable `RESULT {json}` line, and the
//! comparison table of `loadtest compare`.

use serde::Serialize;

use crate::servers::Kind;

/// Wall-clock microseconds: notifications carry it, so latency is measured
/// from the `/notify` call to the client's read.
pub use channels::notification::now_us;

/// Notify-to-delivery latencies in microseconds. A plain vector per
/// receiver (a histogram per socket would cost more than the socket).
#[derive(Default)]
pub struct Latencies(Vec<u32>);

impl Latencies {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn record(&mut self, us: u64) {
        self.0.push(us.min(u32::MAX as u64) as u32);
    }
    pub fn merge(&mut self, other: &Latencies) {
        self.0.extend_from_slice(&other.0);
    }
    /// (p50, p99, max) in milliseconds; zeros when empty.
    fn summary(mut self) -> (f64, f64, f64) {
        if self.0.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        self.0.sort_unstable();
        let at = |q: f64| self.0[((self.0.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        (at(0.5), at(0.99), at(1.0))
    }
}

/// The outcome of one scenario against one server.
#[derive(Serialize, Default, Clone)]
pub struct Report {
    pub scenario: &'static str,
    pub server: Option<Kind>,
    pub nodes: usize,
    pub connections: usize,
    pub connects_per_s: f64,
    /// Server RSS growth per connection (idle; flood: once connected).
    pub rss_per_connection_kib: f64,
    /// Flood: the server's peak RSS growth per connection.
    pub peak_rss_per_connection_kib: f64,
    /// Idle: kernel memory outside RSS, per connection, the server's ends
    /// (`KernelSockets`): socket buffers, then the sockets' slab objects
    /// (`None` where `/proc/slabinfo` is not readable).
    pub kernel_buffers_per_connection_kib: f64,
    pub kernel_structures_per_connection_kib: Option<f64>,
    pub notifies: u64,
    pub notifies_per_s: f64,
    pub deliveries_per_s: f64,
    /// Deliveries expected (accepted notifies times their sockets).
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub out_of_order: u64,
    /// Clients the server closed before the end: slow clients, in a flood.
    pub closed_by_server: u64,
    /// Connection attempts refused or timed out (storm).
    pub refused: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Server CPU time (all nodes) per accepted notify.
    pub server_cpu_us_per_notify: f64,
    /// Server CPU time per connection while connecting (idle).
    pub server_cpu_us_per_connect: f64,
    pub redis_cpu_us_per_notify: Option<f64>,
    /// Cores the servers (all nodes) kept busy while notifies were posted:
    /// CPU seconds over wall seconds.
    pub server_cores: f64,
    /// Cores the generator kept busy meanwhile, measured the same way.
    pub generator_cores: f64,
    pub seconds: f64,
}

impl Report {
    pub fn new(scenario: &'static str, server: Kind, latencies: Latencies) -> Self {
        let (p50_ms, p99_ms, max_ms) = latencies.summary();
        Report {
            scenario,
            server: Some(server),
            nodes: 1,
            p50_ms,
            p99_ms,
            max_ms,
            ..Default::default()
        }
    }

    /// One line for people, one `RESULT` line for programs.
    pub fn print(&self) {
        println!(
            "{:<8} {:<8} conns {:>6} ({:>6.0}/s) rss/conn {:>5.1} KiB | notifies {:>7} ({:>8.0}/s) deliveries/s {:>9.0} | lost {} ooo {} | p50 {:.2} p99 {:.2} max {:.2} ms | cpu {:.0} µs/notify | cores busy: server {:.2} generator {:.2}",
            self.scenario,
            self.server.unwrap_or(Kind::Channels).name(),
            self.connections,
            self.connects_per_s,
            self.rss_per_connection_kib,
            self.notifies,
            self.notifies_per_s,
            self.deliveries_per_s,
            self.lost,
            self.out_of_order,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.server_cpu_us_per_notify,
            self.server_cores,
            self.generator_cores,
        );
        println!(
            "RESULT {}",
            serde_json::to_string(self).expect("serializable")
        );
    }
}

/// The median of `values` (upper median for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
