//! The `tendril-operator` command line as a user meets it: `--print-config` shows the
//! effective configuration (flag > environment > file > default), and a bad file is refused
//! with the key and the file named, before anything connects anywhere.

use std::path::Path;
use std::process::{Command, Output};

fn operator(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tendril-operator"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // The test's own environment must not leak settings in.
    for var in [
        "TENDRIL_CONFIG",
        "TENDRIL_METRICS_BIND",
        "TENDRIL_LEASE_NAME",
        "TENDRIL_LOG_FORMAT",
    ] {
        if !env.iter().any(|(k, _)| *k == var) {
            cmd.env_remove(var);
        }
    }
    cmd.output().expect("running tendril-operator")
}

fn committed_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/operator.yaml")
        .to_string_lossy()
        .into_owned()
}

fn temp_file(name: &str, text: &str) -> tempfile::TempPath {
    let mut f = tempfile::Builder::new()
        .prefix(name)
        .suffix(".yaml")
        .tempfile()
        .unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f.into_temp_path()
}

#[test]
fn print_config_layers_flag_over_env_over_file() {
    let file = temp_file(
        "op",
        "http:\n  bindAddress: 10.1.1.1:1\nleaderElection:\n  leaseName: from-file\n  leaseNamespace: from-file\n",
    );
    let out = operator(
        &[
            "--config",
            file.to_str().unwrap(),
            "--print-config",
            "--lease-name",
            "from-flag",
        ],
        &[
            ("TENDRIL_LEASE_NAME", "from-env"),
            ("TENDRIL_METRICS_BIND", "127.0.0.1:7777"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        yaml.contains("leaseName: from-flag"),
        "flag beats env and file:\n{yaml}"
    );
    assert!(
        yaml.contains("bindAddress: 127.0.0.1:7777"),
        "env beats file:\n{yaml}"
    );
    assert!(
        yaml.contains("leaseNamespace: from-file"),
        "file beats default:\n{yaml}"
    );
    assert!(
        yaml.contains("leaseDurationSeconds: 15"),
        "defaults fill the rest:\n{yaml}"
    );
}

#[test]
fn print_config_of_the_committed_file_round_trips() {
    let out = operator(&["--config", &committed_config(), "--print-config"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    // What it prints is itself a valid configuration file with the same content.
    let again = temp_file("printed", &printed);
    let out2 = operator(
        &["--config", again.to_str().unwrap(), "--print-config"],
        &[],
    );
    assert!(
        out2.status.success(),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    assert_eq!(String::from_utf8(out2.stdout).unwrap(), printed);
    // And equals the output without any file: the committed file is the defaults.
    let bare = operator(&["--print-config"], &[]);
    assert_eq!(String::from_utf8(bare.stdout).unwrap(), printed);
}

#[test]
fn unknown_or_mistyped_key_is_refused_with_key_and_file() {
    let file = temp_file("bad", "leaderElection:\n  leaseNmae: x\n");
    let out = operator(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(err.contains("leaderElection.leaseNmae"), "{err}");

    let file = temp_file("bad", "backoff:\n  maxMillis: soon\n");
    let out = operator(&["--config", file.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backoff.maxMillis") && err.contains(file.to_str().unwrap()),
        "{err}"
    );

    let out = operator(&["--config", "/nonexistent/operator.yaml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/operator.yaml"));
}
