//! External programs the tests drive (redis-server, redis-cli, haproxy,
//! chromium, promtool, kubernetes-validate): present on the machine, or
//! installed on first use from Debian's packages or PyPI, so `cargo test`
//! alone works on a fresh machine (as root, like CI).

use std::{process::Command, sync::Mutex};

/// Serialises installs across the tests of one binary.
static INSTALL: Mutex<()> = Mutex::new(());

/// Makes sure `command` is on the PATH, installing the Debian `package` if needed.
pub fn require(command: &str, package: &str) {
    install_if_missing(
        command,
        &format!(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"
        ),
        &format!("apt-get install {package}"),
    );
}

/// Makes sure `command` is on the PATH, installing the PyPI `package` if needed.
pub fn require_pip(command: &str, package: &str) {
    install_if_missing(
        command,
        &format!("python3 -m pip install -q {package}"),
        &format!("pip install {package}"),
    );
}

fn install_if_missing(command: &str, install: &str, hint: &str) {
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if found(command) {
        return;
    }
    eprintln!("{command} not found: running {install}");
    let installed = Command::new("sh")
        .args(["-c", install])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed && found(command),
        "{command} is needed by the tests: install it with `{hint}`"
    );
}

fn found(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
