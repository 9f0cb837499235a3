//! The systemd units in contrib/systemd: `systemd-analyze verify` accepts
//! them without a single complaint (it warns about unknown keys and bad
//! values on stderr while still exiting 0), with ExecStart pointing at the
//! binary just built; and they ask for what the agent needs.

use std::{path::Path, process::Command};

use lb_testkit::TempDir;

const XDPLB: &str = env!("CARGO_BIN_EXE_xdplb");
const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd");

fn verify(unit: &str, as_name: &str) -> String {
    let text = std::fs::read_to_string(Path::new(UNITS).join(unit)).unwrap();
    let dir = TempDir::new(format!("/tmp/xdplb-units-{}-{as_name}", std::process::id())).unwrap();
    let path = dir.0.join(as_name);
    std::fs::write(&path, text.replace("/usr/sbin/xdplb", XDPLB)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && stderr.trim().is_empty(), "{unit}: {stderr}");
    text
}

#[test]
fn the_agent_unit_verifies_and_is_a_notify_service_with_reload_and_restart() {
    let text = verify("xdplb.service", "xdplb.service");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "ReadWritePaths=/sys/fs/bpf",
    ] {
        assert!(text.lines().any(|l| l == line), "xdplb.service lacks {line:?}");
    }
}

#[test]
fn the_decap_template_verifies_for_an_interface() {
    let text = verify("xdplb-decap@.service", "xdplb-decap@eth0.service");
    assert!(text.contains("ExecStart=/usr/sbin/xdplb decap --interface %i\n"), "{text}");
    assert!(text.contains("ExecStop=/usr/sbin/xdplb decap --interface %i --detach\n"), "{text}");
}
