//! A Debian -cloud kernel and an initramfs for it, cached under
//! target/kernels/<kernel>/<release>/ so reruns neither download nor build.
//!
//! Packages come through an apt configuration of our own (sources, lists
//! and cache under target/kernels/apt/<suite>), so the bullseye source is
//! never seen by the host's apt and cannot upgrade any host package.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use super::Kernel;

/// Modules the guest loads before anything else runs: the -cloud kernels
/// build virtio PCI, virtio-fs (the host's root), veth (the tests' hosts)
/// and the clsact qdisc and cls_bpf (the frame hook before tcx) as
/// modules, and the guest has no /lib/modules of its own to load from.
const MODULES: [&str; 5] = ["virtio_pci", "virtiofs", "veth", "sch_ingress", "cls_bpf"];

pub struct Image {
    /// `uname -r` of the kernel, e.g. 6.1.0-50-cloud-amd64.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
}

pub fn prepare(root: &Path, kernel: &Kernel) -> anyhow::Result<Image> {
    let cache = root.join("target/kernels").join(kernel.name);
    let release = match cached_release(&cache, kernel)? {
        Some(release) => release,
        None => download(root, &cache, kernel)?,
    };
    let dir = cache.join(&release);
    let initramfs = dir.join("initramfs.cpio");
    let init = std::fs::read(root.join("scripts/kernels-init.sh"))?;
    // The initramfs carries scripts/kernels-init.sh and the modules; a
    // changed script or module list rebuilds it.
    let built_from = dir.join("init");
    let mut recipe = init.clone();
    recipe.extend_from_slice(format!("\n# modules: {MODULES:?}\n").as_bytes());
    if !initramfs.exists() || std::fs::read(&built_from).ok().as_ref() != Some(&recipe) {
        build_initramfs(&dir, &release, &init)?;
        std::fs::write(&built_from, &recipe)?;
    }
    Ok(Image {
        vmlinuz: dir.join("vmlinuz"),
        initramfs,
        release,
    })
}

/// A release downloaded before: a directory with a vmlinuz, which is
/// written last.
fn cached_release(cache: &Path, kernel: &Kernel) -> anyhow::Result<Option<String>> {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return Ok(None);
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{}.", kernel.name)) && entry.path().join("vmlinuz").exists() {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Downloads the suite's current -cloud kernel and unpacks it; returns its
/// release.
fn download(root: &Path, cache: &Path, kernel: &Kernel) -> anyhow::Result<String> {
    let apt = root.join("target/kernels/apt").join(kernel.suite);
    for dir in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(dir))?;
    }
    std::fs::write(
        apt.join("sources.list"),
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian {} main\n",
            kernel.suite
        ),
    )?;
    let private = |tool: &str| {
        let mut command = Command::new(tool);
        command.current_dir(cache).args([
            "-q",
            &format!(
                "-oDir::Etc::SourceList={}",
                apt.join("sources.list").display()
            ),
            "-oDir::Etc::SourceParts=/nonexistent",
            &format!("-oDir::State::Lists={}", apt.join("lists").display()),
            &format!("-oDir::Cache={}", apt.join("cache").display()),
            // Nothing here is installed: the host's package state is not ours.
            "-oDir::State::Status=/dev/null",
            // apt's _apt user cannot write into the cache directory.
            "-oAPT::Sandbox::User=root",
        ]);
        command
    };
    std::fs::create_dir_all(cache)?;
    crate::run(private("apt-get").arg("update"))?;
    // The metapackage depends on exactly the suite's current kernel.
    let depends = private("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()?;
    let package = String::from_utf8_lossy(&depends.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .with_context(|| format!("no linux-image-cloud-amd64 in {}", kernel.suite))?;
    let release = package.trim_start_matches("linux-image-").to_owned();
    crate::run(private("apt-get").args(["download", &package]))?;
    let deb = std::fs::read_dir(cache)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download left no {package} .deb"))?;
    let dir = cache.join(&release);
    let tree = dir.join("tree");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    // The package ships no modules.dep: its postinst runs depmod.
    crate::run(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    std::fs::remove_file(&deb)?;
    std::fs::copy(
        tree.join(format!("boot/vmlinuz-{release}")),
        dir.join("vmlinuz"),
    )?;
    Ok(release)
}

/// A newc cpio with a static busybox, the modules of [`MODULES`] with
/// their dependencies, the order to load them in, and kernels-init.sh as
/// /init.
fn build_initramfs(dir: &Path, release: &str, init: &[u8]) -> anyhow::Result<()> {
    let tree = dir.join("tree");
    let staging = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&staging);
    for sub in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(staging.join(sub))?;
    }
    std::fs::copy("/bin/busybox", staging.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    let init_path = staging.join("init");
    std::fs::write(&init_path, init)?;
    crate::run(Command::new("chmod").arg("+x").arg(&init_path))?;

    let modules_dir = tree.join("lib/modules").join(release);
    let mut load_order: Vec<String> = Vec::new();
    for module in MODULES {
        let output = Command::new("modprobe")
            .arg("-d")
            .arg(&tree)
            .args(["-S", release, "--show-depends", module])
            .output()?;
        if !output.status.success() {
            bail!(
                "modprobe --show-depends {module}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // "insmod /path/x.ko" per module to load, dependencies first;
        // "builtin x" for what is built in.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Some(path) = line.strip_prefix("insmod ") else {
                continue;
            };
            let relative = Path::new(path.trim())
                .strip_prefix(&modules_dir)
                .with_context(|| format!("{path} outside {}", modules_dir.display()))?
                .to_string_lossy()
                .into_owned();
            if !load_order.contains(&relative) {
                let target = staging.join("lib/modules").join(&relative);
                std::fs::create_dir_all(target.parent().expect("a module has a directory"))?;
                std::fs::copy(path.trim(), target)?;
                load_order.push(relative);
            }
        }
    }
    std::fs::write(staging.join("modules.load"), load_order.join("\n") + "\n")?;
    let cpio = std::fs::File::create(dir.join("initramfs.cpio"))?;
    crate::run(
        Command::new("sh")
            .current_dir(&staging)
            .args(["-c", "find . | cpio --quiet -o -H newc"])
            .stdout(cpio),
    )
    .context("packing the initramfs")
}
