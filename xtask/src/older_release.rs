//! The older release the upgrade test starts from: built once from git
//! history into its own target directory, then reused.
//!
//! `upgrade_from_an_older_release_keeps_flows_and_moves_the_state_it_reshaped`
//! (tests/netns.rs) needs flows held by an older data plane, with the older
//! map shapes, while the new agent takes over its pins. Only a real older
//! binary gives that.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::exec;

/// The last commit before the maps were reshaped (BACKENDS 4096 → 16384
/// slots, RINGS retired for RING_SLOTS): the upgrade that must move state.
const COMMIT: &str = "698956410739f1a78d7712f36b3664d6571fb841";

/// The older `xdplb` binary, built if needed; `None` (said on stderr) when
/// this checkout lacks the commit, as a shallow clone does.
pub fn binary(root: &Path) -> Result<Option<PathBuf>> {
    let have_commit = Command::new("git")
        .current_dir(root)
        .args(["cat-file", "-e", &format!("{COMMIT}^{{commit}}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_commit {
        eprintln!(
            "xtask test: commit {COMMIT} is not in this checkout (a shallow clone?): \
             the upgrade-from-an-older-release test stays skipped"
        );
        return Ok(None);
    }
    let dir = root.join("target/older-release").join(&COMMIT[..12]);
    let binary = dir.join("target/debug/xdplb");
    let source = dir.join("src");
    if !source.exists() {
        eprintln!("xtask test: extracting {COMMIT} into {}", source.display());
        // Extracted beside, then renamed: an interrupted run leaves no half tree.
        let partial = dir.join("src.partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)?;
        let archive = format!("git archive --format=tar {COMMIT} | tar -x -C '{}'", partial.display());
        exec(Command::new("bash").current_dir(root).args(["-o", "pipefail", "-c", &archive]))?;
        std::fs::rename(&partial, &source)?;
    }
    // Cargo decides whether anything is left to build; a second run costs
    // a second or two.
    exec(Command::new("cargo").current_dir(&source).env("CARGO_TARGET_DIR", dir.join("target")).args([
        "build",
        "--package",
        "lb-userspace",
        "--bin",
        "xdplb",
    ]))
    .with_context(|| format!("building the older release {COMMIT}"))?;
    Ok(Some(binary))
}
