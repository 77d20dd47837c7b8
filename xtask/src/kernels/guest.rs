//! One boot of a kernel under qemu (software emulation: the host's CPU offers
//! no virtualisation) with the host's root shared by virtiofsd, and its
//! serial console collected until the guest powers off or time runs out.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::image::Image;

/// The whole guest, boot included; two kernels run one after the other
/// within CI's budget of about 20 minutes.
const GUEST_TIMEOUT: Duration = Duration::from_secs(12 * 60);
const MEMORY: &str = "3G";

/// The console of one boot, each line with when it arrived.
pub struct Console {
    pub lines: Vec<(Duration, String)>,
    /// From qemu's start to its exit, or to the timeout.
    pub elapsed: Duration,
    pub timed_out: bool,
}

/// Children killed when dropped: qemu and virtiofsd never outlive a run,
/// whichever way it ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Boots `image` with `env` (name, path) on the kernel command line, which
/// the kernel hands to the guest's init as environment. The console goes to
/// `dir`/console.log as it arrives.
pub fn boot(image: &Image, dir: &Path, env: &[(&str, &Path)]) -> anyhow::Result<Console> {
    let socket = dir.join("virtiofs.sock");
    let _ = std::fs::remove_file(&socket);
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new("/usr/lib/qemu/virtiofsd")
            .arg(format!("--socket-path={}", socket.display()))
            // The namespace sandbox cannot pivot_root on the host's own root.
            .args(["-o", "source=/,cache=always,sandbox=chroot"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("virtiofsd.log"))?)
            .spawn()
            .context("starting virtiofsd")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!(
                "virtiofsd made no socket; see {}",
                dir.join("virtiofsd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut append = String::from("console=ttyS0 quiet panic=-1");
    for (name, path) in env {
        append.push_str(&format!(" {name}={}", path.display()));
    }
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-m", MEMORY])
        // virtio-fs needs the guest's memory shared with virtiofsd.
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={MEMORY},share=on"),
            "-numa",
            "node,memdev=mem",
        ])
        .args([
            "-chardev",
            &format!("socket,id=hostroot,path={}", socket.display()),
            "-device",
            "vhost-user-fs-pci,chardev=hostroot,tag=hostroot",
        ])
        // No network but the guest's own: loopback and the tests' veths.
        .args(["-nic", "none"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(&image.initramfs)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("qemu.log"))?)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = qemu.stdout.take().expect("piped");
    processes.0.push(qemu);

    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The serial console is not always UTF-8 (a test's binary output).
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            if lines_tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut log = std::fs::File::create(dir.join("console.log"))?;
    let mut lines = Vec::new();
    let timed_out = loop {
        let left = GUEST_TIMEOUT.saturating_sub(start.elapsed());
        match lines_rx.recv_timeout(left) {
            Ok((at, line)) => {
                writeln!(log, "{line}")?;
                lines.push((at, line));
            }
            // qemu closed the console: the guest powered off.
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(mpsc::RecvTimeoutError::Timeout) => break true,
        }
    };
    let elapsed = start.elapsed();
    drop(processes);
    let _ = std::fs::remove_file(&socket);
    Ok(Console {
        lines,
        elapsed,
        timed_out,
    })
}
