//! How `hack/test.sh` runs the suite's test binaries: concurrently, longest first.
//!
//! `cargo test` runs one test binary after another; most of ours are a single end-to-end
//! test that spends its time waiting on an apiserver, a BGP hold timer or a network
//! namespace, so the suite's wall time was the sum of the binaries'. Every test is already
//! isolated from every other (own namespaces, dedicated planes, reserved ports, names of
//! its own), because libtest runs the tests of one binary on several threads; running
//! several binaries at once relies on nothing more.
//!
//! This module is the pure part of `tendril-test-runner` (the binary does the processes):
//! reading the binaries out of `cargo test --no-run --message-format=json`, the durations
//! remembered from earlier runs, and the longest-first order that keeps the longest
//! binaries from starting last.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

/// One test executable cargo built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// `package/kind/name`, e.g. `tendril-e2e/test/pods_churn`: stable across builds (the
    /// executable's hash is not), so it keys the remembered durations.
    pub key: String,
    /// The target's name, e.g. `pods_churn` or `tendril_controllers`.
    pub name: String,
    pub package: String,
    pub executable: PathBuf,
    /// The target's main source file (cargo's `Running SRC (EXE)` line names it).
    pub src_path: PathBuf,
    /// The package's directory: cargo runs a test binary there, with
    /// `CARGO_MANIFEST_DIR` set to it.
    pub package_dir: PathBuf,
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    package_id: String,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    profile: Option<Profile>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
    src_path: PathBuf,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

/// The test executables in the JSON messages of `cargo test --no-run
/// --message-format=json…`, in the order cargo reported them, each once.
pub fn test_binaries(cargo_json: &str) -> Result<Vec<TestBinary>> {
    let mut out: Vec<TestBinary> = Vec::new();
    for line in cargo_json.lines().filter(|l| l.starts_with('{')) {
        let msg: Message =
            serde_json::from_str(line).with_context(|| format!("cargo message: {line}"))?;
        if msg.reason != "compiler-artifact" || !msg.profile.is_some_and(|p| p.test) {
            continue;
        }
        let (Some(executable), Some(target), Some(manifest)) =
            (msg.executable, msg.target, msg.manifest_path)
        else {
            continue;
        };
        let package = package_name(&msg.package_id);
        let kind = target.kind.first().cloned().unwrap_or_default();
        let key = format!("{package}/{kind}/{}", target.name);
        if out.iter().any(|b| b.key == key) {
            continue;
        }
        out.push(TestBinary {
            key,
            name: target.name,
            package,
            executable,
            src_path: target.src_path,
            package_dir: manifest.parent().map(PathBuf::from).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// The package name in a cargo package id: `path+file:///w/e2e#tendril-e2e@0.1.0` (the
/// name is the directory's when the fragment has only a version: `…/e2e#0.1.0`).
fn package_name(id: &str) -> String {
    let (url, fragment) = id.split_once('#').unwrap_or((id, ""));
    match fragment.split_once('@') {
        Some((name, _)) => name.to_string(),
        None if fragment.chars().next().is_some_and(|c| c.is_ascii_digit())
            || fragment.is_empty() =>
        {
            url.rsplit('/').next().unwrap_or(url).to_string()
        }
        None => fragment.to_string(),
    }
}

/// Seconds each binary took on earlier runs, by [`TestBinary::key`]; one `KEY SECONDS`
/// per line, `#` comments. Lines that do not parse are skipped (the file only orders the
/// work).
pub fn parse_durations(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.trim().rsplit_once(char::is_whitespace)?;
            Some((k.trim().to_string(), v.parse::<f64>().ok()?))
        })
        .collect()
}

pub fn format_durations(durations: &BTreeMap<String, f64>) -> String {
    durations
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}\n"))
        .collect()
}

/// What a binary never timed before is assumed to take: long enough that it starts early
/// (a new end-to-end test is usually one of the long ones).
pub const UNKNOWN_SECONDS: f64 = 90.0;

/// The order to start the binaries in: longest expected first (the classic greedy
/// schedule: with N slots it ends within 4/3 of the best possible), ties by key.
pub fn longest_first(binaries: &[TestBinary], durations: &BTreeMap<String, f64>) -> Vec<usize> {
    let expected = |b: &TestBinary| durations.get(&b.key).copied().unwrap_or(UNKNOWN_SECONDS);
    let mut order: Vec<usize> = (0..binaries.len()).collect();
    order.sort_by(|&a, &b| {
        expected(&binaries[b])
            .total_cmp(&expected(&binaries[a]))
            .then_with(|| binaries[a].key.cmp(&binaries[b].key))
    });
    order
}

/// The names of the failed tests in a binary's libtest output (`test NAME ... FAILED`).
pub fn failed_tests(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARGO_JSON: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/e2e#tendril-e2e@0.1.0","manifest_path":"/w/e2e/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"pods_churn","src_path":"/w/e2e/tests/pods_churn.rs","edition":"2024","doc":false,"doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/t/debug/deps/pods_churn-abc"],"executable":"/t/debug/deps/pods_churn-abc","fresh":true}
{"reason":"compiler-artifact","package_id":"registry+https://github.com/rust-lang/crates.io-index#serde@1.0.228","manifest_path":"/r/serde/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"serde","src_path":"/r/serde/src/lib.rs"},"profile":{"test":false},"executable":null,"fresh":true}
{"reason":"compiler-artifact","package_id":"path+file:///w/controllers#0.1.0","manifest_path":"/w/controllers/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"tendril_controllers","src_path":"/w/controllers/src/lib.rs"},"profile":{"test":true},"executable":"/t/debug/deps/tendril_controllers-def","fresh":false}
{"reason":"compiler-artifact","package_id":"path+file:///w/datapath#tendril-datapath@0.1.0","manifest_path":"/w/datapath/Cargo.toml","target":{"kind":["bin"],"crate_types":["bin"],"name":"tendril-agent","src_path":"/w/datapath/src/bin/tendril-agent.rs"},"profile":{"test":false},"executable":"/t/debug/tendril-agent","fresh":true}
{"reason":"build-finished","success":true}
"#;

    #[test]
    fn only_test_executables_are_taken_with_their_package_and_directory() {
        let bins = test_binaries(CARGO_JSON).unwrap();
        assert_eq!(bins.len(), 2, "{bins:?}");
        assert_eq!(bins[0].key, "tendril-e2e/test/pods_churn");
        assert_eq!(bins[0].package_dir, PathBuf::from("/w/e2e"));
        assert_eq!(
            bins[0].src_path,
            PathBuf::from("/w/e2e/tests/pods_churn.rs")
        );
        assert_eq!(bins[1].key, "controllers/lib/tendril_controllers");
        assert_eq!(
            bins[1].executable,
            PathBuf::from("/t/debug/deps/tendril_controllers-def")
        );
    }

    #[test]
    fn a_message_that_is_not_json_is_an_error() {
        assert!(test_binaries("{not json").is_err());
        assert!(test_binaries("   Compiling x v1\n").unwrap().is_empty());
    }

    #[test]
    fn durations_round_trip_and_bad_lines_are_skipped() {
        let d = parse_durations("# a comment 1\na/test/x 12.5\nnonsense\nb/lib/y 3\n\n");
        assert_eq!(d.len(), 2);
        assert_eq!(d["a/test/x"], 12.5);
        assert_eq!(parse_durations(&format_durations(&d)), d);
    }

    #[test]
    fn the_longest_start_first_and_unknown_ones_count_as_long() {
        let bin = |k: &str| TestBinary {
            key: k.into(),
            name: k.into(),
            package: "p".into(),
            executable: PathBuf::new(),
            src_path: PathBuf::new(),
            package_dir: PathBuf::new(),
        };
        let bins = [bin("short"), bin("long"), bin("new"), bin("mid")];
        let d = parse_durations("short 2\nlong 170\nmid 40\n");
        let names: Vec<&str> = longest_first(&bins, &d)
            .into_iter()
            .map(|i| bins[i].key.as_str())
            .collect();
        assert_eq!(names, ["long", "new", "mid", "short"]);
    }

    #[test]
    fn failed_tests_are_read_from_libtest_output() {
        let out = "running 3 tests\ntest a::b ... ok\ntest c ... FAILED\ntest d ... ignored\n";
        assert_eq!(failed_tests(out), ["c"]);
    }
}
