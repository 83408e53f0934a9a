//! The `channels` binary; the commands live in `channels::cli`.

fn main() -> std::process::ExitCode {
    channels::cli::main()
}
