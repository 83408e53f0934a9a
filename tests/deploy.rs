//! deploy/ is kept true: the Kubernetes manifests validate against the
//! Kubernetes schemas, the alert rules pass `promtool`, and every metric the
//! rules and the Grafana dashboard name is one a node exports (and the
//! dashboard shows every metric a node exports).

mod common;

use std::{collections::BTreeSet, path::Path, process::Command};

use common::tools::{require, require_pip};

fn deploy(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    require_pip("kubernetes-validate", "kubernetes-validate");
    let mut manifests: Vec<_> = std::fs::read_dir(deploy("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    let kinds: Vec<String> = manifests
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for kind in [
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    ] {
        assert!(
            kinds.iter().any(|k| k.contains(&format!("kind: {kind}\n"))),
            "no {kind} in deploy/k8s"
        );
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&manifests)
        .output()
        .unwrap();
    assert_success(&out);
}

#[test]
fn alert_rules_pass_promtool() {
    require("promtool", "prometheus");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert_success(&out);
}

/// Fails with the command's output unless it succeeded.
fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `channels_*` metric names in a text, histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("channels_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| {
                n.strip_suffix(s).map(String::from).unwrap_or(n)
            });
        names.insert(base);
    }
    names
}

#[tokio::test]
async fn rules_and_dashboard_name_exactly_the_exported_metrics() {
    let node = common::start(&[]).await;
    // Per-channel series exist only while a channel has sockets.
    let _socket = node.socket("alice", "admin").await;
    let exported: BTreeSet<String> = node
        .metrics_text()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    assert!(exported.len() >= 10, "{exported:?}");
    let rules = metric_names(&read("prometheus/alerts.yml"));
    let dashboard = metric_names(&read("grafana/dashboards/channels.json"));
    serde_json::from_str::<serde_json::Value>(&read("grafana/dashboards/channels.json"))
        .expect("dashboard is JSON");
    for name in rules.iter().chain(&dashboard) {
        assert!(
            exported.contains(name),
            "{name} is not exported by the server"
        );
    }
    for name in &exported {
        assert!(
            dashboard.contains(name),
            "the dashboard has no panel for {name}"
        );
    }
}

#[test]
fn compose_mounts_files_that_exist_and_the_dockerfile_checks_health_with_the_binary() {
    let compose = read("docker-compose.yml");
    for line in compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
    {
        let path = line.split(':').next().unwrap();
        assert!(
            deploy(path).exists(),
            "docker-compose.yml mounts missing deploy/{path}"
        );
    }
    assert!(
        compose.contains("./haproxy/haproxy.cfg"),
        "compose uses the tested balancer config"
    );
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked"));
    // cargo loads every workspace member's manifest, even to build one binary.
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("a workspace members line");
    for member in members
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| *m != ".")
    {
        let whole = dockerfile.contains(&format!("COPY {member} ./{member}\n"));
        let manifest_and_sources = dockerfile.contains(&format!("COPY {member}/Cargo.toml"))
            && dockerfile.contains(&format!("COPY {member}/src"));
        assert!(
            whole || manifest_and_sources,
            "the Dockerfile copies workspace member {member}"
        );
    }
    // The carried crates are built into the binary, members or not.
    for line in manifest
        .lines()
        .filter(|l| l.contains("{ path = \"vendor/"))
    {
        let path = line.split('"').nth(1).unwrap();
        assert!(
            dockerfile.contains(&format!("COPY {path} ./{path}\n")),
            "the Dockerfile copies the carried crate {path}"
        );
    }
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/channels", "probe""#));
    assert!(dockerfile.contains("USER 10001"));
}

/// The fuzz targets are a workspace of their own, which the main manifest's
/// `[patch.crates-io]` does not reach: it must carry the same patches, or
/// it fuzzes crates.io's versions of the carried crates instead of ours.
#[test]
fn the_fuzz_workspace_patches_in_every_carried_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let patches = |manifest: &str| -> BTreeSet<(String, String)> {
        let text = std::fs::read_to_string(root.join(manifest)).unwrap();
        text.lines()
            .skip_while(|l| l.trim() != "[patch.crates-io]")
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with('['))
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| {
                let (name, rest) = l.split_once('=')?;
                let path = rest.split('"').nth(1)?;
                // Both as seen from the repository's root.
                let from = root.join(manifest).parent().unwrap().join(path);
                let path = from.canonicalize().unwrap_or(from);
                Some((name.trim().to_owned(), path.display().to_string()))
            })
            .collect()
    };
    let main = patches("Cargo.toml");
    assert!(!main.is_empty(), "the main manifest carries patched crates");
    assert_eq!(patches("tests/fuzz/Cargo.toml"), main);
}
