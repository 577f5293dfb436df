//! Writes every CRD manifest and the kustomization into a directory (default `crds/manifests`).
//!
//! `tendril-crdgen [DIR]`; `tendril-crdgen --check [DIR]` exits 1 when the directory differs.

use std::path::PathBuf;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.first().is_some_and(|a| a == "--check");
    if check {
        args.remove(0);
    }
    let dir = PathBuf::from(
        args.first()
            .cloned()
            .unwrap_or_else(|| "crds/manifests".into()),
    );
    let crds = tendril_crds::all_crds();
    let mut files: Vec<(String, String)> = crds
        .iter()
        .map(|crd| {
            (
                tendril_crds::manifest_file_name(crd),
                tendril_crds::render_crd(crd),
            )
        })
        .collect();
    files.push((
        "kustomization.yaml".into(),
        tendril_crds::render_kustomization(&crds),
    ));
    let mut stale = Vec::new();
    for (name, body) in &files {
        let path = dir.join(name);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(body.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            std::fs::create_dir_all(&dir).expect("create manifest directory");
            std::fs::write(&path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }
    if check && !stale.is_empty() {
        eprintln!("CRD manifests are stale; run `cargo run -p tendril-crds --bin tendril-crdgen`:");
        for path in stale {
            eprintln!("  {path}");
        }
        std::process::exit(1);
    }
}
