//! External programs the tests drive (redis-server, redis-cli, haproxy):
//! present on the machine, or installed from Debian's packages on first use,
//! so `cargo test` alone works on a fresh machine (as root, like CI).

use std::{process::Command, sync::Mutex};

/// Serialises installs across the tests of one binary.
static INSTALL: Mutex<()> = Mutex::new(());

/// Makes sure `command` is on the PATH, installing `package` if needed.
pub fn require(command: &str, package: &str) {
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if found(command) {
        return;
    }
    eprintln!("{command} not found: installing the Debian package {package}");
    let installed = Command::new("sh")
        .args(["-c", &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed && found(command),
        "{command} is needed by the tests: install it with `apt-get install {package}`"
    );
}

fn found(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
