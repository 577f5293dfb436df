//! Compiles the eBPF programs in `bpf/*.c` with clang into `OUT_DIR`, where
//! `src/bpf/loader.rs` embeds them with `aya::include_bytes_aligned!`; and the part of
//! GoBGP's gRPC API the agent uses (`proto/gobgp.proto`) into Rust with protox (a protobuf
//! compiler in Rust: no `protoc` needed) and tonic, for `src/bgp/api.rs`; and Hubble's
//! Observer API with the gRPC health service (`proto/hubble/*.proto`,
//! `proto/grpc_health.proto`), client and server, for `src/flows`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let bpf_dir = manifest_dir.join("bpf");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    println!("cargo:rerun-if-changed={}", bpf_dir.join("lib").display());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&bpf_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", bpf_dir.display()))
        .map(|entry| entry.expect("bpf dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "c"))
        .collect();
    sources.sort();
    for header in std::fs::read_dir(bpf_dir.join("lib")).expect("bpf/lib") {
        println!(
            "cargo:rerun-if-changed={}",
            header.expect("header").path().display()
        );
    }
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
        compile(&clang, &bpf_dir, source, &out_dir);
    }
    compile_gobgp_api(&manifest_dir.join("proto"));
    compile_observer_api(&manifest_dir.join("proto"));
}

/// `proto/hubble/{flow,relay,observer}.proto` and `proto/grpc_health.proto` →
/// `OUT_DIR/{flow,relay,observer,grpc.health.v1}.rs` (servers and clients: the agent serves,
/// the relay serves and calls).
fn compile_observer_api(proto_dir: &Path) {
    let files = [
        proto_dir.join("hubble/flow.proto"),
        proto_dir.join("hubble/relay.proto"),
        proto_dir.join("hubble/observer.proto"),
        proto_dir.join("grpc_health.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [proto_dir])
        .unwrap_or_else(|e| panic!("compiling the Observer API: {e}"));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("generating the Observer API: {e}"));
}

/// `proto/gobgp.proto` → `OUT_DIR/apipb.rs` (a client only).
fn compile_gobgp_api(proto_dir: &Path) {
    let proto = proto_dir.join("gobgp.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile([&proto], [proto_dir])
        .unwrap_or_else(|e| panic!("compiling {}: {e}", proto.display()));
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("generating the GoBGP client: {e}"));
}

fn compile(clang: &str, bpf_dir: &Path, source: &Path, out_dir: &Path) {
    let stem = source.file_stem().expect("source file name");
    let object = out_dir.join(stem).with_extension("o");
    let (multiarch, bpf_arch) = host_arch();
    let output = Command::new(clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{bpf_arch}"))
        .arg("-I")
        .arg(bpf_dir.join("lib"))
        .arg("-I")
        .arg(format!("/usr/include/{multiarch}-linux-gnu"))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object)
        .output();
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{clang}` not found: the eBPF programs need clang (and libbpf-dev for \
             <bpf/bpf_helpers.h>); run hack/install-prereqs.sh or set CLANG"
        ),
        Err(e) => panic!("running {clang}: {e}"),
        Ok(out) if !out.status.success() => panic!(
            "clang failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
}

/// The Debian multiarch name (its include directory holds `asm/types.h`) and
/// libbpf's `__TARGET_ARCH_*` name of the target.
fn host_arch() -> (&'static str, &'static str) {
    match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => ("aarch64", "arm64"),
        _ => ("x86_64", "x86"),
    }
}
