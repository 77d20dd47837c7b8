//! Embeds the BPF object built by `cargo xtask build`.
//!
//! Host-only builds (check, clippy, unit tests) work without the BPF
//! toolchain: when no object exists an empty one is embedded, and loading it
//! fails with a message that says how to build the real one.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let default_object =
        manifest_dir.join("../agent-ebpf/target/bpfel-unknown-none/release/tollgate");
    let object = env::var_os("TOLLGATE_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default_object);
    println!("cargo:rerun-if-env-changed=TOLLGATE_BPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("tollgate.bpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no BPF object at {}; embedding an empty stub (run `cargo xtask build`)",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
