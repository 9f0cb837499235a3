//! `cargo xtask package`: the Debian package, built by cargo-deb from
//! `[package.metadata.deb]` in lb-userspace/Cargo.toml. The completions and
//! man pages it ships are generated here by the release binary itself (from
//! the clap definitions), into target/release/package/.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::exec;

pub fn run(root: &Path) -> Result<PathBuf> {
    exec(Command::new("cargo").current_dir(root).args(["build", "--release", "--package", "lb-userspace"]))?;
    let release = root.join("target/release");
    let xdplb = release.join("xdplb");
    let generated = release.join("package");
    let _ = fs::remove_dir_all(&generated);
    fs::create_dir_all(generated.join("completions"))?;
    for (shell, file) in [("bash", "xdplb.bash"), ("zsh", "_xdplb"), ("fish", "xdplb.fish")] {
        let script = stdout(Command::new(&xdplb).args(["completions", shell]))?;
        fs::write(generated.join("completions").join(file), script)?;
    }
    let man = generated.join("man");
    stdout(Command::new(&xdplb).arg("manpages").arg("--dir").arg(&man))?;
    // Debian ships man pages gzip-compressed; -n keeps the archive reproducible.
    let pages: Vec<PathBuf> = fs::read_dir(&man)?.flatten().map(|e| e.path()).collect();
    exec(Command::new("gzip").args(["-9nf"]).args(&pages))?;

    let out = stdout(Command::new("cargo").current_dir(root).args(["deb", "--package", "lb-userspace", "--no-build"]))?;
    let deb = PathBuf::from(out.lines().last().unwrap_or_default().trim());
    if deb.extension().is_none_or(|e| e != "deb") || !deb.exists() {
        bail!("cargo deb did not name the package it wrote: {out}");
    }
    println!("{}", deb.display());
    Ok(deb)
}

fn stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
