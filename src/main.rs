//! The `channels` binary; the commands live in `channels::cli`.

/// jemalloc instead of glibc's malloc: a node's memory is mostly many small
/// per-connection allocations made and freed by several threads, which
/// glibc's per-thread arenas keep after a flood of connections has gone
/// (tests/hostile_clients.rs measures it); jemalloc returns freed pages to
/// the system (mimalloc did too, with a higher peak). Its background thread
/// (the `background_threads` feature) does so on time: without it pages
/// are purged only when a thread allocates again, so after a flood an idle
/// node kept up to 20 MB more for as long as it stayed idle (the test
/// failed 1 run in 3).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    channels::cli::main()
}
