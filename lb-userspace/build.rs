//! Builds the XDP program (`lb-ebpf`) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, and leaves it in OUT_DIR so that `xdplb` embeds
//! it and ships as one self-contained binary.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found in the workspace"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("lb-ebpf manifest has no parent directory"))?;
    let mut packages =
        vec![aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }];
    // Test builds also embed the upgrade-test variant of the program.
    let variant = metadata.packages.iter().find(|p| p.name.as_str() == "lb-ebpf-variant");
    let variant_dir = variant.and_then(|p| p.manifest_path.parent());
    if std::env::var_os("CARGO_FEATURE_TEST_HOOKS").is_some() {
        let (variant, dir) = variant.zip(variant_dir).ok_or_else(|| anyhow!("lb-ebpf-variant not in the workspace"))?;
        packages.push(aya_build::Package { name: variant.name.as_str(), root_dir: dir.as_str(), ..Default::default() });
    }
    aya_build::build_ebpf(packages, aya_build::Toolchain::default())
}
