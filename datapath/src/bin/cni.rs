//! tendril-cni: the CNI plugin (spec 0.3.0–1.1.0). It asks the node's `tendril-agent` for
//! addresses over a unix socket and wires the pod's veth; see `tendril_datapath::cni`.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => tendril_datapath::cni::plugin::run(|name| std::env::var(name).ok(), &stdin),
        Err(e) => tendril_datapath::cni::plugin::Outcome {
            exit_code: 1,
            stdout: serde_json::json!({"cniVersion": tendril_datapath::cni::spec::LATEST, "code": 5, "msg": "failed to read stdin", "details": e.to_string()}).to_string(),
        },
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(outcome.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(outcome.exit_code);
}
