//! `cargo xtask image [--test]`: the agent's image, assembled with buildah
//! from scratch (no base image can be pulled here) out of the binaries CI
//! tests and the libraries they link, exported as an OCI archive; with
//! `--test`, run under podman as deploy/daemonset.yaml runs it
//! (tests/tests/image.rs).
//!
//! deploy/Dockerfile builds the same image where a registry builds from
//! source: the same files at the same paths, the same entrypoint (a unit
//! test below holds the two together).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The image's name, as the DaemonSet names it.
pub const IMAGE: &str = "localhost/tollgate/agent:0.1.0";
/// Where the binaries go, and which.
const BIN_DIR: &str = "/usr/local/bin";
const BINARIES: [&str; 2] = ["tollgate-agent", "tollgatectl"];
const ENTRYPOINT: &str = "/usr/local/bin/tollgate-agent";

/// The image's container storage, kept apart from the host's under
/// target/image (vfs: this machine's kernel offers no overlay for it).
pub fn storage_args(root: &Path) -> Vec<String> {
    let storage = root.join("target/image/storage");
    vec![
        "--root".into(),
        storage.join("root").display().to_string(),
        "--runroot".into(),
        storage.join("run").display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
    ]
}

/// Builds the image from target/debug (what `cargo xtask build` made and
/// the tests ran) and writes target/image/tollgate-agent.oci.tar.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let out = root.join("target/image");
    let rootfs = out.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let bin = rootfs.join(BIN_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&bin)?;
    let mut libraries = BTreeSet::new();
    for binary in BINARIES {
        let built = root.join("target/debug").join(binary);
        let copy = bin.join(binary);
        std::fs::copy(&built, &copy).with_context(|| format!("copying {}", built.display()))?;
        // Line tables are for the test suite's backtraces; the image ships
        // without them.
        crate::run(Command::new("strip").arg("--strip-debug").arg(&copy))?;
        libraries.extend(linked_libraries(&built)?);
    }
    for library in &libraries {
        let target = rootfs.join(library.strip_prefix("/").unwrap_or(library));
        std::fs::create_dir_all(target.parent().expect("a library has a directory"))?;
        std::fs::copy(library, &target)
            .with_context(|| format!("copying {}", library.display()))?;
    }

    let storage = storage_args(root);
    let buildah = |args: &[&str]| -> anyhow::Result<String> {
        let output = Command::new("buildah")
            .args(&storage)
            .args(args)
            .output()
            .context("running buildah (scripts/setup.sh installs it)")?;
        if !output.status.success() {
            bail!(
                "buildah {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let container = buildah(&["from", "scratch"])?;
    let built = (|| {
        buildah(&["copy", &container, &rootfs.display().to_string(), "/"])?;
        buildah(&[
            "config",
            "--entrypoint",
            &format!("[\"{ENTRYPOINT}\"]"),
            "--label",
            "org.opencontainers.image.source=https://github.com/tollgate/tollgate",
            &container,
        ])?;
        buildah(&["commit", "--rm", "-q", &container, IMAGE])
    })();
    if built.is_err() {
        let _ = buildah(&["rm", &container]);
    }
    built?;
    let archive = out.join("tollgate-agent.oci.tar");
    let _ = std::fs::remove_file(&archive);
    buildah(&[
        "push",
        "-q",
        IMAGE,
        &format!("oci-archive:{}:{IMAGE}", archive.display()),
    ])?;
    println!("image {IMAGE}: {}", archive.display());
    Ok(archive)
}

/// The shared libraries `binary` loads, by `ldd` (the vDSO has no file).
fn linked_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output()?;
    if !output.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Runs the container test against the image just built.
pub fn test(root: &Path) -> anyhow::Result<()> {
    crate::run(
        Command::new("cargo")
            .current_dir(root)
            .args([
                "test",
                "-p",
                "tollgate-tests",
                "--test",
                "image",
                "--",
                "--include-ignored",
            ])
            .env("TOLLGATE_IMAGE", IMAGE)
            .env("TOLLGATE_IMAGE_STORAGE", storage_args(root).join(" ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Dockerfile's last stage copies the same binaries to the same
    /// directory and starts the same entrypoint.
    #[test]
    fn the_dockerfile_puts_the_same_files_in_the_image() {
        let dockerfile = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile"),
        )
        .unwrap();
        let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
        let copy = last_stage
            .lines()
            .find(|line| line.starts_with("COPY "))
            .expect("the last stage copies the binaries");
        let words: Vec<&str> = copy.split_whitespace().collect();
        let (destination, sources) = words[1..].split_last().unwrap();
        let copied: Vec<&str> = sources
            .iter()
            .filter(|word| !word.starts_with("--"))
            .map(|source| source.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(copied, BINARIES);
        assert_eq!(destination.trim_end_matches('/'), BIN_DIR);
        assert!(
            last_stage.contains(&format!("ENTRYPOINT [\"{ENTRYPOINT}\"]")),
            "{last_stage}"
        );
    }
}
