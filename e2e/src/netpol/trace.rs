//! `tendrilctl policy trace` over the truth-table world: one run of the real binary traces
//! every ordered pair of pods on every probed port/protocol, and the verdicts become a
//! [`Table`] to compare with the model and with the packets.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::probe::{PortProto, Table};
use super::world::World;
use crate::target_bin_dir;

/// Runs `tendrilctl policy trace -o json` for all pairs × `keys`; returns the verdicts and
/// the command's exit code (1 when any packet is denied).
pub async fn trace_table(
    world: &World,
    kubeconfig: &Path,
    keys: &[PortProto],
) -> Result<(Table, i32)> {
    let names = world.short_names();
    // Real `namespace/pod` of each short name (`x/a`).
    let real: Vec<String> = names
        .iter()
        .map(|n| {
            let (ns, pod) = n.split_once('/').expect("short names are ns/pod");
            format!("{}/{pod}", world.ns(ns))
        })
        .collect();
    let ports: Vec<String> = keys
        .iter()
        .map(|k| format!("{}/{}", k.port, k.protocol.as_str().to_ascii_uppercase()))
        .collect();
    let binary = target_bin_dir().join("tendrilctl");
    let output = tokio::process::Command::new(&binary)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["policy", "trace", "-o", "json"])
        .arg("--from")
        .arg(real.join(","))
        .arg("--to")
        .arg(real.join(","))
        .arg("--port")
        .arg(ports.join(","))
        .output()
        .await
        .with_context(|| {
            format!(
                "running {} (build it: cargo build --workspace --bins)",
                binary.display()
            )
        })?;
    let code = output.status.code().unwrap_or(-1);
    if code != 0 && code != 1 {
        bail!(
            "tendrilctl policy trace exited {code}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let traces: Vec<Value> = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "tendrilctl's JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    let mut verdicts: HashMap<(String, String, String), bool> = HashMap::new();
    // Called once the world realized every policy: no trace may doubt what the nodes enforce.
    let warnings: Vec<&Value> = traces.iter().filter_map(|t| t.get("warnings")).collect();
    if !warnings.is_empty() {
        bail!("tendrilctl warns of unrealized policies: {warnings:?}");
    }
    for t in &traces {
        let field = |k: &str| t[k].as_str().unwrap_or_default().to_string();
        let allowed = t["allowed"]
            .as_bool()
            .context("a trace without \"allowed\"")?;
        verdicts.insert((field("from"), field("to"), field("port")), allowed);
    }
    let index: HashMap<&PortProto, &String> = keys.iter().zip(&ports).collect();
    let mut missing = Vec::new();
    let table = Table::from_fn(names.clone(), keys, |from, to, k| {
        let key = (real[from].clone(), real[to].clone(), index[&k].clone());
        verdicts.get(&key).copied().unwrap_or_else(|| {
            missing.push(format!("{} -> {} {}", names[from], names[to], k));
            false
        })
    });
    if !missing.is_empty() {
        bail!("tendrilctl traced no verdict for {missing:?}");
    }
    Ok((table, code))
}
