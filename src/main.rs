//! The `channels` binary; the commands live in `channels::cli`.

/// jemalloc instead of glibc's malloc: a node's memory is mostly many small
/// per-connection allocations made and freed by several threads, which
/// glibc's per-thread arenas keep after a flood of connections has gone
/// (tests/hostile_clients.rs measures it); jemalloc returns freed pages to
/// the system (mimalloc did too, with a higher peak).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    channels::cli::main()
}
