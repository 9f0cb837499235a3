//! What ships: the systemd units in contrib/systemd, which `systemd-analyze
//! verify` accepts without a single complaint (it warns about unknown keys
//! and bad values on stderr while still exiting 0), with ExecStart pointing
//! at the binary just built, and which ask for what the agent needs; and the
//! Debian package `cargo xtask package` builds (`cargo xtask test` builds it
//! first and names it in XDPLB_DEB).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use lb_testkit::TempDir;

const XDPLB: &str = env!("CARGO_BIN_EXE_xdplb");
const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd");

fn verify(unit: &str, as_name: &str) -> String {
    verify_with(&Path::new(UNITS).join(unit), as_name, XDPLB)
}

/// `systemd-analyze verify` on the unit at `path`, installed as `as_name`
/// and running `binary`; returns the unit's text.
fn verify_with(path: &Path, as_name: &str, binary: &str) -> String {
    let unit = path.display().to_string();
    let text = std::fs::read_to_string(path).unwrap();
    let dir = TempDir::new(format!("/tmp/xdplb-units-{}-{as_name}", std::process::id())).unwrap();
    let path = dir.0.join(as_name);
    std::fs::write(&path, text.replace("/usr/sbin/xdplb", binary)).unwrap();
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

#[test]
fn the_register_template_verifies_for_a_service_and_deregisters_on_stop() {
    let text = verify("xdplb-register@.service", "xdplb-register@web.service");
    assert!(
        text.contains(
            "ExecStart=/usr/sbin/xdplb register --etcd ${XDPLB_ETCD} --service %i --address ${XDPLB_ADDRESS} \
             $XDPLB_REGISTER_ARGS\n"
        ),
        "{text}"
    );
    // SIGTERM is what makes `xdplb register` delete its key.
    assert!(text.contains("KillSignal=SIGTERM\n") && text.contains("EnvironmentFile=/etc/xdplb/register-%i.env\n"));
}

/// Runs a command that must succeed; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn package() -> PathBuf {
    let deb = std::env::var_os("XDPLB_DEB")
        .expect("XDPLB_DEB names the package under test; `cargo xtask test` builds it and sets it");
    PathBuf::from(deb)
}

#[test]
fn the_package_holds_the_binary_config_units_completions_and_man_pages() {
    let deb = package();
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    // "-rwxr-xr-x 0/0 SIZE DATE TIME ./PATH" → (mode, owner, PATH)
    let entries: Vec<(&str, &str, &str)> = listing
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields[0], fields[1], fields[5].trim_start_matches('.'))
        })
        .collect();
    let files: BTreeSet<&str> = entries.iter().filter(|(mode, ..)| mode.starts_with('-')).map(|(.., p)| *p).collect();
    for expected in [
        "/usr/sbin/xdplb",
        "/etc/xdplb/xdplb.toml",
        "/usr/lib/systemd/system/xdplb.service",
        "/usr/lib/systemd/system/xdplb-decap@.service",
        "/usr/lib/systemd/system/xdplb-register@.service",
        "/usr/share/bash-completion/completions/xdplb",
        "/usr/share/zsh/vendor-completions/_xdplb",
        "/usr/share/fish/vendor_completions.d/xdplb.fish",
        "/usr/share/xdplb/grafana/xdplb.json",
        "/usr/share/doc/xdplb/copyright",
    ] {
        assert!(files.contains(expected), "the package lacks {expected}:\n{listing}");
    }
    assert!(entries.iter().all(|(_, owner, _)| *owner == "0/0"), "files not owned by root:\n{listing}");
    assert!(
        entries.iter().any(|(mode, _, p)| *p == "/usr/sbin/xdplb" && *mode == "-rwxr-xr-x"),
        "the binary is not mode 755:\n{listing}"
    );

    // One man page per documented command, as the binary generates them.
    let pages = TempDir::new(format!("/tmp/xdplb-pkg-man-{}", std::process::id())).unwrap();
    run(Command::new(XDPLB).arg("manpages").arg("--dir").arg(&pages.0));
    let generated: BTreeSet<String> = std::fs::read_dir(&pages.0)
        .unwrap()
        .flatten()
        .map(|e| format!("/usr/share/man/man8/{}.gz", e.file_name().to_string_lossy()))
        .collect();
    let shipped: BTreeSet<String> =
        files.iter().filter(|p| p.starts_with("/usr/share/man/")).map(|p| p.to_string()).collect();
    assert!(generated.len() > 10 && shipped == generated, "man pages: shipped {shipped:?}, generated {generated:?}");

    let fields = run(Command::new("dpkg-deb").arg("--field").arg(&deb).args(["Package", "Version", "Depends"]));
    assert!(fields.contains("Package: xdplb\n"), "{fields}");
    assert!(fields.contains(&format!("Version: {}-1\n", env!("CARGO_PKG_VERSION"))), "{fields}");
    assert!(fields.contains("Depends: libc6"), "{fields}");
    let conffiles = run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/xdplb/xdplb.toml", "the example config must be a conffile");
}

#[test]
fn what_the_package_installs_runs_and_its_scripts_neither_start_nor_break_a_running_agent() {
    let deb = package();
    let root = TempDir::new(format!("/tmp/xdplb-pkg-{}", std::process::id())).unwrap();
    run(Command::new("dpkg-deb").arg("--extract").arg(&deb).arg(&root.0));
    let binary = root.0.join("usr/sbin/xdplb");

    let version = run(Command::new(&binary).arg("--version"));
    assert_eq!(version.trim(), format!("xdplb {}", env!("CARGO_PKG_VERSION")));
    let config = root.0.join("etc/xdplb/xdplb.toml");
    let checked = run(Command::new(&binary).arg("check").arg("--config").arg(&config));
    assert!(checked.contains(": ok"), "the shipped config does not check: {checked}");
    assert!(checked.contains("map memory: ") && checked.contains("CONNTRACK"), "{checked}");

    let units = root.0.join("usr/lib/systemd/system");
    for unit in ["xdplb.service", "xdplb-decap@.service", "xdplb-register@.service"] {
        let shipped = std::fs::read_to_string(units.join(unit)).unwrap();
        assert_eq!(shipped, std::fs::read_to_string(Path::new(UNITS).join(unit)).unwrap(), "{unit} differs");
    }
    let binary_text = binary.to_str().unwrap();
    verify_with(&units.join("xdplb.service"), "xdplb.service", binary_text);
    verify_with(&units.join("xdplb-decap@.service"), "xdplb-decap@eth0.service", binary_text);
    verify_with(&units.join("xdplb-register@.service"), "xdplb-register@web.service", binary_text);

    let completion = root.0.join("usr/share/bash-completion/completions/xdplb");
    let complete =
        run(Command::new("bash").arg("-c").arg(format!("source {} && complete -p xdplb", completion.display())));
    assert!(complete.contains("-F _xdplb xdplb"), "{complete}");
    let page = run(Command::new("gzip").arg("-dc").arg(root.0.join("usr/share/man/man8/xdplb-run.8.gz")));
    assert!(page.contains(".TH xdplb-run 8"), "{page}");

    // Maintainer scripts: a fresh install enables and starts nothing (the
    // config comes first); an upgrade restarts a running agent (it adopts
    // the pinned state, so forwarding goes on); removal detaches xdplb.
    let control = root.0.join("DEBIAN");
    run(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(&control));
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("daemon-reload"), "{postinst}");
    assert!(postinst.contains("try-restart xdplb.service"), "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke start") && !postinst.contains("_dh_action=start"), "{postinst}");
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(prerm.contains("xdplb stop --config /etc/xdplb/xdplb.toml"), "{prerm}");
    assert!(prerm.contains("deb-systemd-invoke stop xdplb.service"), "{prerm}");
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }
}
