//! Embeds the kernel object when it has been built, so the release binary is
//! the whole product in one file.
//!
//! `cargo xtask build` builds the object first and passes its path in
//! `LIMITER_EBPF_OBJECT`; a plain `cargo build` embeds the object from the
//! workspace's target directory if one is there. Without an object (a host
//! without nightly or bpf-linker) the agent still builds: it then needs
//! `--ebpf-object FILE` or runs with `kernel.mode = "off"`/`"auto"`.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(limiter_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=LIMITER_EBPF_OBJECT");
    let object = match env::var_os("LIMITER_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/bpfel-unknown-none/release/limiter-ebpf")
        }
    };
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        let out =
            PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("limiter-ebpf.o");
        std::fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
        println!("cargo::rustc-cfg=limiter_ebpf_embedded");
    } else {
        println!(
            "cargo::warning=no eBPF object at {} (run `cargo xtask build-ebpf`): building without the kernel programs",
            object.display()
        );
    }
}
