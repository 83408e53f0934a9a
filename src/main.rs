//! The `channels` binary; the commands live in `channels::cli`.

/// mimalloc instead of glibc's malloc: a node's memory is mostly many small
/// per-connection allocations made and freed by several threads, which
/// glibc's per-thread arenas keep after a flood of connections has gone
/// (tests/hostile_clients.rs measures it); mimalloc returns freed pages to
/// the system.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    channels::cli::main()
}
