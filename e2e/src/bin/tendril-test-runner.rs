//! `tendril-test-runner`: what `hack/test.sh`'s `cargo test` step runs. It builds the tests
//! as `cargo test --no-run` does, then runs the test binaries `--jobs` at a time, longest
//! first (durations remembered from earlier runs), plus the doctests; see
//! `tendril_e2e::suite` for why.
//!
//! Each binary's output is kept whole and printed when it ends, under cargo's own
//! `Running SRC (EXE)` header, so the log reads like `cargo test`'s; the end prints a table
//! of every binary's time and verdict. No fail-fast: every binary runs. Exit status 0 when
//! all passed, 101 (cargo's) otherwise.
//!
//! ```text
//! tendril-test-runner [--jobs N] [--test-threads N] [--durations FILE] [CARGO ARGS…] [-- TEST ARGS…]
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tendril_e2e::suite::{
    TestBinary, failed_tests, format_durations, longest_first, parse_durations, test_binaries,
};

#[derive(Parser)]
#[command(
    name = "tendril-test-runner",
    about = "Runs the workspace's test binaries concurrently"
)]
struct Cli {
    /// Test binaries running at once.
    #[arg(long, default_value_t = 3)]
    jobs: usize,
    /// libtest's --test-threads inside each binary.
    #[arg(long, default_value_t = 4)]
    test_threads: usize,
    /// Where the durations of earlier runs are kept (read to order the work, rewritten).
    #[arg(long)]
    durations: Option<PathBuf>,
    /// Durations to start from where `--durations` has none (the repository's
    /// `hack/test-durations`, so a fresh machine's first run is ordered too).
    #[arg(long)]
    seed_durations: Option<PathBuf>,
    /// Arguments for `cargo test --no-run` (e.g. `-p tendril-e2e --test pods_e2e`); after
    /// `--`, arguments for every test binary (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// A unit of work: a test binary, or the doctests (run through cargo, which builds them).
enum Job {
    Binary(TestBinary),
    Doctests,
}

struct Finished {
    label: String,
    key: String,
    seconds: f64,
    passed: bool,
    failed_tests: Vec<String>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(101),
        Err(e) => {
            eprintln!("tendril-test-runner: {e:#}");
            ExitCode::from(101)
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    let (cargo_args, test_args) = match cli.args.iter().position(|a| a == "--") {
        Some(i) => (cli.args[..i].to_vec(), cli.args[i + 1..].to_vec()),
        None => (cli.args.clone(), Vec::new()),
    };
    let binaries = build(&cargo_args)?;
    let durations_file = cli.durations.clone();
    let read = |f: &Option<PathBuf>| {
        f.as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| parse_durations(&t))
            .unwrap_or_default()
    };
    let mut durations = read(&cli.seed_durations);
    durations.extend(read(&durations_file));

    let mut jobs: Vec<Job> = longest_first(&binaries, &durations)
        .into_iter()
        .map(|i| Job::Binary(binaries[i].clone()))
        .collect();
    // The doctests are cargo's to build and run; only a run of the whole workspace has them
    // (a run narrowed by cargo arguments is asking for particular targets).
    if cargo_args.is_empty() {
        jobs.push(Job::Doctests);
    }
    let total = jobs.len();
    eprintln!(
        "tendril-test-runner: {} test binaries{}, {} at a time, --test-threads={}",
        binaries.len(),
        if cargo_args.is_empty() {
            " and the doctests"
        } else {
            ""
        },
        cli.jobs,
        cli.test_threads
    );

    let started = Instant::now();
    let queue = Arc::new(Mutex::new(jobs.into_iter()));
    let (tx, rx) = mpsc::channel::<Finished>();
    let workers: Vec<_> = (0..cli.jobs.max(1))
        .map(|_| {
            let queue = Arc::clone(&queue);
            let tx = tx.clone();
            let test_args = test_args.clone();
            let threads = cli.test_threads;
            std::thread::spawn(move || {
                loop {
                    let Some(job) = queue.lock().expect("queue").next() else {
                        break;
                    };
                    let finished = run_job(&job, threads, &test_args);
                    if tx.send(finished).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(tx);

    let mut results: Vec<Finished> = Vec::new();
    for f in rx {
        eprintln!(
            "tendril-test-runner: [{}/{total}] {} {:6.1}s {}",
            results.len() + 1,
            if f.passed { "ok  " } else { "FAIL" },
            f.seconds,
            f.label
        );
        results.push(f);
    }
    for w in workers {
        let _ = w.join();
    }
    let wall = started.elapsed().as_secs_f64();

    for f in &results {
        durations.insert(f.key.clone(), f.seconds);
    }
    if let Some(file) = durations_file
        && let Err(e) = std::fs::write(&file, format_durations(&durations))
    {
        eprintln!(
            "tendril-test-runner: could not keep durations in {}: {e}",
            file.display()
        );
    }

    results.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let failed: Vec<&Finished> = results.iter().filter(|f| !f.passed).collect();
    let busy: f64 = results.iter().map(|f| f.seconds).sum();
    println!("\n──────── test binaries (longest first) ────────");
    for f in &results {
        println!(
            "{} {:7.1}s  {}",
            if f.passed { "ok  " } else { "FAIL" },
            f.seconds,
            f.label
        );
    }
    println!(
        "{} binaries, {} failed; wall {:.0}s for {:.0}s of binary time ({:.1}× by running {} at a time)",
        results.len(),
        failed.len(),
        wall,
        busy,
        busy / wall.max(1.0),
        cli.jobs
    );
    for f in &failed {
        println!("failed: {} {}", f.label, f.failed_tests.join(" "));
    }
    Ok(failed.is_empty() && results.len() == total)
}

/// `cargo test --no-run` with JSON messages on stdout (diagnostics rendered to stderr as
/// usual): the test executables it built.
fn build(cargo_args: &[String]) -> Result<Vec<TestBinary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    if cargo_args.is_empty() {
        cmd.arg("--workspace");
    }
    cmd.args(cargo_args).stdout(Stdio::piped());
    let mut child = cmd.spawn().context("starting cargo test --no-run")?;
    let mut json = String::new();
    let mut reader = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if line.starts_with('{') {
            json.push_str(&line);
        } else {
            print!("{line}");
        }
        line.clear();
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test --no-run failed ({status}): no test ran");
    }
    test_binaries(&json)
}

fn run_job(job: &Job, test_threads: usize, test_args: &[String]) -> Finished {
    let started = Instant::now();
    let threads = format!("--test-threads={test_threads}");
    let (label, key, header, mut cmd) = match job {
        Job::Binary(b) => {
            let mut cmd = Command::new(&b.executable);
            cmd.arg(&threads)
                .args(test_args)
                .current_dir(&b.package_dir)
                .env("CARGO_MANIFEST_DIR", &b.package_dir)
                .env("CARGO_PKG_NAME", &b.package);
            (
                format!("{} ({})", b.name, b.package),
                b.key.clone(),
                format!(
                    "     Running {} ({})",
                    b.src_path.display(),
                    b.executable.display()
                ),
                cmd,
            )
        }
        Job::Doctests => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["test", "--workspace", "--doc", "--"])
                .arg(&threads)
                .args(test_args);
            (
                "doctests (workspace)".to_string(),
                "doctests".to_string(),
                "   Doc-tests (workspace)".to_string(),
                cmd,
            )
        }
    };
    let (output, passed) = match capture(&mut cmd) {
        Ok(r) => r,
        Err(e) => (format!("could not run it: {e:#}\n"), false),
    };
    // One write per binary: the outputs of concurrent binaries never interleave.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "\n{header}\n{output}");
    let _ = stdout.flush();
    Finished {
        label,
        key,
        seconds: started.elapsed().as_secs_f64(),
        passed,
        failed_tests: failed_tests(&output),
    }
}

/// Runs `cmd` with stdout and stderr into one temporary file (one file, so the two stay in
/// the order they were written), and returns what it wrote and whether it exited 0.
fn capture(cmd: &mut Command) -> Result<(String, bool)> {
    let mut file = tempfile()?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file.try_clone()?)
        .status()
        .context("spawn")?;
    let mut output = String::new();
    std::io::Seek::rewind(&mut file)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    output.push_str(&String::from_utf8_lossy(&bytes));
    Ok((output, status.success()))
}

/// An anonymous file (unlinked at once), so a killed run leaves nothing behind.
fn tempfile() -> Result<File> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "tendril-test-runner-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::fs::remove_file(&path).ok();
    Ok(file)
}
