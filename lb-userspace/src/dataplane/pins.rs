//! Where the data plane's state lives between agent runs: a bpffs directory
//! holding every stateful map and the XDP link.
//!
//! `PIN_DIR/layout-N/` holds the pins of layout version N (see
//! `lb_common::LAYOUT_VERSION`). An agent adopts only its own layout: finding
//! another one, or pinned maps whose sizes differ from what the configuration
//! asks for, it refuses to start rather than corrupt the state.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use lb_common::{Capacity, LAYOUT_VERSION, MAP_SPECS, MapKind, UNUSED_TABLE_ENTRIES};

use super::{DataplaneParams, TablesInUse};
use crate::announce::NodeState;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The pin directory of this binary's layout inside `root`.
pub fn layout_dir(root: &Path) -> PathBuf {
    root.join(format!("layout-{LAYOUT_VERSION}"))
}

pub fn link_pin(layout_dir: &Path) -> PathBuf {
    layout_dir.join("link")
}

const REPLY_LINK_PREFIX: &str = "reply-link-";

/// The link of the program on an interface NAT replies arrive on.
pub fn reply_link_pin(layout_dir: &Path, ifindex: u32) -> PathBuf {
    layout_dir.join(format!("{REPLY_LINK_PREFIX}{ifindex}"))
}

/// Interfaces with a pinned reply link in `layout_dir`.
pub fn reply_link_interfaces(layout_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(layout_dir) else {
        return Vec::new();
    };
    entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix(REPLY_LINK_PREFIX)?.parse().ok()).collect()
}

/// Marks a drained node (`xdplb node drain`): a directory in the pin root,
/// so that the state outlives agent restarts like the rest of the node's
/// state does, and `xdplb stop` clears it with the pins.
const NODE_DRAINED_MARKER: &str = "node-drained";

pub fn node_state(root: &Path) -> NodeState {
    if root.join(NODE_DRAINED_MARKER).is_dir() { NodeState::Drained } else { NodeState::Active }
}

pub fn set_node_state(root: &Path, node: NodeState) -> Result<()> {
    let marker = root.join(NODE_DRAINED_MARKER);
    match node {
        NodeState::Drained if !marker.is_dir() => {
            std::fs::create_dir_all(&marker).with_context(|| format!("creating {}", marker.display()))
        }
        NodeState::Active if marker.is_dir() => {
            std::fs::remove_dir(&marker).with_context(|| format!("removing {}", marker.display()))
        }
        _ => Ok(()),
    }
}

/// Makes sure `root` can hold pins: bpffs is mounted at /sys/fs/bpf when it
/// is not (as on some minimal systems), and the directory exists.
pub fn prepare(root: &Path) -> Result<()> {
    if root.starts_with(BPFFS_MOUNT) && !is_bpffs(Path::new(BPFFS_MOUNT)) {
        mount_bpffs()?;
        log::info!("mounted bpffs at {BPFFS_MOUNT}");
    }
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        bail!("pin_dir {} is not on a bpf filesystem (mount -t bpf bpf DIR)", root.display());
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|stat| stat.filesystem_type().0 == BPF_FS_MAGIC)
}

fn mount_bpffs() -> Result<()> {
    std::fs::create_dir_all(BPFFS_MOUNT)?;
    nix::mount::mount(Some("bpf"), BPFFS_MOUNT, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mounting bpffs at {BPFFS_MOUNT}"))
}

/// Refuses pinned state of another layout version under `root`.
pub fn check_layout(root: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("layout-")
            && version != LAYOUT_VERSION.to_string()
        {
            bail!(
                "{} holds pinned state of map layout {version}, but this xdplb uses layout {LAYOUT_VERSION}: \
                 adopting it would corrupt the state. Run the xdplb that wrote it, or remove it \
                 (xdplb stop --pin-dir {}) and start fresh, which loses the connection table",
                root.display(),
                root.display()
            );
        }
    }
    Ok(())
}

/// Maps that earlier versions of this layout pinned and this one no longer
/// uses: `RINGS` held 32-bit slots, now `RING_SLOTS` holds 16-bit ones. An
/// upgraded agent fills the new map before its program is swapped in;
/// the old program keeps the old map until then.
const RETIRED_MAPS: &[&str] = &["RINGS"];

/// Unpins `RETIRED_MAPS` (a program that still uses one keeps it alive).
pub fn remove_retired(layout_dir: &Path) -> Result<()> {
    for name in RETIRED_MAPS {
        let path = layout_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("unpinning the retired map {}", path.display()))?;
            log::info!("unpinned {}, which this version no longer uses", path.display());
        }
    }
    Ok(())
}

/// The tables only some services need (`TablesInUse`), against what is
/// pinned in `layout_dir`: one pinned full size stays full size (it may hold
/// the flows of a service just removed), so the result is `wanted` plus
/// those. A one-entry pin of a table the result needs is removed (nothing
/// ever wrote it), so that the next load creates the full-size table.
pub fn resolve_tables(layout_dir: &Path, wanted: TablesInUse) -> Result<TablesInUse> {
    let on_demand = |capacity: Capacity, tables: TablesInUse| match capacity {
        Capacity::Affinity => Some(tables.affinity),
        Capacity::Nat => Some(tables.nat),
        _ => None,
    };
    let mut tables = wanted;
    let mut tiny = Vec::new();
    for spec in MAP_SPECS.iter().filter(|spec| spec.pinned && on_demand(spec.capacity, wanted).is_some()) {
        let path = layout_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info =
            aya::maps::MapInfo::from_pin(&path).with_context(|| format!("reading pinned map {}", path.display()))?;
        if info.max_entries() > UNUSED_TABLE_ENTRIES {
            match spec.capacity {
                Capacity::Affinity => tables.affinity = true,
                _ => tables.nat = true,
            }
        } else {
            tiny.push((spec.capacity, path));
        }
    }
    for (capacity, path) in tiny {
        if on_demand(capacity, tables) == Some(true) {
            std::fs::remove_file(&path).with_context(|| format!("unpinning the unused {}", path.display()))?;
        }
    }
    Ok(tables)
}

/// Refuses pinned maps whose shape differs from what this start needs
/// (ring_size, max_services or conntrack_size changed, or a layout changed
/// without a version bump). The expectations come from the map schema.
pub fn check_pinned_maps(layout_dir: &Path, params: &DataplaneParams) -> Result<()> {
    for spec in MAP_SPECS.iter().filter(|spec| spec.pinned) {
        let path = layout_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info =
            aya::maps::MapInfo::from_pin(&path).with_context(|| format!("reading pinned map {}", path.display()))?;
        // The half-open table only bounds the handshakes in flight: one of an
        // earlier size (HALF_OPEN_SHARE changed) is adopted as it is.
        let max_entries = match spec.capacity {
            Capacity::HalfOpen => info.max_entries(),
            capacity => params.entries(capacity, spec.default_entries)?,
        };
        let found = (info.key_size() as usize, info.value_size() as usize, info.max_entries());
        // DEVMAP_HASH values are 4 or 8 bytes depending on the kernel.
        let value_ok = found.1 == spec.value_size || (spec.kind == MapKind::DevMapHash && found.1 == 4);
        if found.0 != spec.key_size || !value_ok || found.2 != max_entries {
            bail!(
                "pinned map {} has key {} B, value {} B, {} entries; this start needs key {} B, \
                 value {} B, {max_entries} entries ({}). Restore the previous settings, or \
                 remove the pinned state (xdplb stop) and start fresh, which loses the connection table",
                path.display(),
                found.0,
                found.1,
                found.2,
                spec.key_size,
                spec.value_size,
                match spec.capacity {
                    Capacity::Rings => "ring_size × max_services changed",
                    Capacity::Conntrack | Capacity::HalfOpen => "conntrack_size changed",
                    Capacity::Nat => "nat_table_size changed",
                    Capacity::Affinity => "conntrack_size changed",
                    Capacity::Fixed => "the map layout changed",
                }
            );
        }
    }
    Ok(())
}

/// Removes the pins under `root` (maps and link). The kernel frees the maps
/// and detaches the program once nothing else holds them.
pub fn remove_all(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || !entry.file_name().to_string_lossy().starts_with("layout-") {
            continue;
        }
        for pin in std::fs::read_dir(&dir)?.flatten() {
            std::fs::remove_file(pin.path()).with_context(|| format!("removing {}", pin.path().display()))?;
            removed.push(pin.path());
        }
        std::fs::remove_dir(&dir)?;
    }
    let _ = std::fs::remove_dir(root.join(NODE_DRAINED_MARKER));
    let _ = std::fs::remove_dir(root);
    // The default root is /sys/fs/bpf/xdplb/IFACE: drop the shared parent too
    // once no other interface's agent uses it (remove_dir fails if not empty).
    if let Some(parent) = root.parent().filter(|p| *p != Path::new(BPFFS_MOUNT)) {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}
