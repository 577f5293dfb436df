//! Issue 7, Prometheus and Grafana: a real Prometheus server (Debian's `prometheus` 2.42)
//! scrapes the operator and the agents of a simulated cluster, and the Grafana dashboard
//! uses only metrics that exist.
//!
//! One dedicated plane; the operator with leader election on (its Lease in the test's
//! namespace), two simulated nodes with one real `tendril-agent` each and one pod per node
//! (pinged from the other, so the datapath has counted packets). Prometheus runs with
//! `hack/prometheus/prometheus.yml` (file-based discovery, scrape interval 1 s) on a free
//! loopback port with a temporary data directory; everything is asserted through its HTTP
//! API: every target `up`, the controller-runtime families with their labels, `tendril_`
//! metrics of both binaries, and that it parsed OpenMetrics (metric family metadata under
//! the OpenMetrics family names, and the `info` type the classic text parser rejects).
//!
//! The dashboard check takes every PromQL expression of `deploy/grafana/tendril-dashboard.json`
//! (panels and template variables), extracts the metric names, and requires each to be
//! stored by that Prometheus, or else to be a family the binaries register (their
//! expositions' `# TYPE` lines, and the `register`/`domain` calls of their source, because
//! prometheus-client writes nothing for a family without a series) that has no sample yet:
//! a counter whose labels only an event creates (reconcile errors here); the test prints
//! which those are. The cluster makes the other events happen: cross-node pings (datapath
//! packets), a third Node that exhausts the pool (IPAM exhaustion). A misspelt name fails,
//! which the test also shows by misspelling one. Needs root (network namespaces, eBPF).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rand::Rng;
use serde_json::{Value, json};
use tendril_e2e::sim::{SimNode, SimPod, Underlay, ensure_node_object};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, eventually, free_port, http_get, repo_root, unique_name,
};

const TIMEOUT: Duration = Duration::from_secs(120);
const LEASE: &str = "tendril-operator";

// ------------------------------------------------------------------ PromQL metric names

/// Aggregation operators: followed by `by`/`without` or `(`, never metric names.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords whose parenthesised argument is a list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Other keywords and literals.
const KEYWORDS: &[&str] = &[
    "bool", "and", "or", "unless", "offset", "atan2", "inf", "nan", "start", "end",
];

/// Skips from `chars[i]` (an opening `open`) to just past its matching `close`, stepping
/// over quoted strings.
fn skip_balanced(chars: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0usize;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i),
            c if c == open => {
                depth += 1;
                i += 1;
            }
            c if c == close => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    i
}

/// Skips the quoted string starting at `chars[i]`.
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' && quote != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// The metric names a PromQL expression selects: identifiers used as a bare selector or
/// followed by `{` or `[`, not functions (followed by `(`), aggregation operators,
/// keywords, label names in `by (…)`/`on (…)` lists or label matchers, numbers, durations,
/// strings or Grafana variables (`$__rate_interval`, `${node}`).
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_balanced(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_balanced(&chars, i, '[', ']');
        } else if c == '#' {
            // A comment runs to the end of the line.
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_balanced(&chars, i, '{', '}');
            } else {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // Numbers (1e3, 0x1f, .5) and durations (5m, 1h30m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let followed_by_paren = chars.get(next) == Some(&'(');
            let lower = ident.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if followed_by_paren {
                    i = skip_balanced(&chars, next, '(', ')');
                }
            } else if followed_by_paren
                || AGGREGATIONS.contains(&lower.as_str())
                || KEYWORDS.contains(&lower.as_str())
            {
                // A function call, an aggregation or a keyword.
            } else {
                names.insert(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The PromQL expressions of a Grafana dashboard: every `expr` of every panel target
/// (nested rows included) and the selector of every `label_values(…)`/`query_result(…)`
/// template variable query.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "expr"
                        && let Some(s) = v.as_str()
                    {
                        out.push(s.to_string());
                    } else {
                        walk(v, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_default()
            .trim();
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            // label_values(selector, label) or label_values(label).
            if let Some((selector, _label)) = args.rsplit_once(',') {
                out.push(selector.trim().to_string());
            }
        } else if let Some(inner) = query
            .strip_prefix("query_result(")
            .and_then(|r| r.strip_suffix(')'))
        {
            out.push(inner.to_string());
        } else if !query.is_empty() && !query.starts_with("label_names(") {
            out.push(query.to_string());
        }
    }
    out
}

/// Sample names of the families an exposition declares with `# TYPE`: what a scrape stores
/// once a family has a series (`counter` → `_total`, `histogram` → `_bucket`/`_sum`/`_count`,
/// `info` → `_info`, `summary` → itself, `_sum`, `_count`).
fn registered_sample_names(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            "info" => &["_info"],
            "stateset" | "gauge" | "unknown" | "untyped" => &[""],
            _ => &[""],
        };
        for s in suffixes {
            out.insert(format!("{family}{s}"));
        }
    }
    out
}

/// The metric type a piece of Rust source names, if any (`Family<L, Counter>`,
/// `Histogram::new(…)`, `Gauge::default`, `Info::new(…)`).
fn type_keyword(text: &str) -> Option<&'static str> {
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    [
        ("Counter", "counter"),
        ("Histogram", "histogram"),
        ("Gauge", "gauge"),
        ("Info", "info"),
    ]
    .into_iter()
    .find(|(k, _)| words.contains(k))
    .map(|(_, t)| t)
}

/// Families the binaries' source registers (`registry.register("name", "help", metric)` and
/// `metrics.domain("name", "help", make)` in `controllers/src` and `datapath/src`), with
/// their types: the registered-metric list for families that only appear in a scrape once
/// an event created a series (prometheus-client writes no `# TYPE` for an empty family).
/// The type is named in the call (`Family::<L, Counter>::default`) or in the declaration
/// of the field the metric comes from or goes to (`reconcile_errors_total:
/// Family<ErrorLabels, Counter>`). Returns `# TYPE` lines for [`registered_sample_names`].
fn source_registered_families() -> Result<String> {
    fn rust_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                rust_files(&p, out)?;
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
        Ok(())
    }
    fn string_literal(s: &str) -> Option<(&str, &str)> {
        let s = s.trim_start().strip_prefix('"')?;
        let end = s.find('"')?;
        Some((&s[..end], &s[end + 1..]))
    }
    let mut files = Vec::new();
    for dir in ["runtime/src", "controllers/src", "datapath/src"] {
        rust_files(&repo_root().join(dir), &mut files)?;
    }
    let mut out = String::new();
    for file in files {
        let src = std::fs::read_to_string(&file)?;
        for (at, call) in src
            .match_indices("domain(")
            .chain(src.match_indices("register("))
        {
            let rest = &src[at + call.len()..];
            // Two string literals: the name and the help (health checks take one).
            let Some((name, rest)) = string_literal(rest) else {
                continue;
            };
            let Some((_help, _)) = rest.trim_start().strip_prefix(',').and_then(string_literal)
            else {
                continue;
            };
            let args_end = {
                let chars: Vec<char> = src[at + call.len() - 1..].chars().collect();
                skip_balanced(&chars, 0, '(', ')')
            };
            let args: String = src[at + call.len() - 1..].chars().take(args_end).collect();
            // The field the call's value goes to (`field: metrics.domain(`), or the field
            // the registered metric comes from (`m.field.clone()`).
            let line_start = src[..at].rfind('\n').map_or(0, |i| i + 1);
            let before = src[line_start..at].trim();
            let assigned = before
                .split(':')
                .next()
                .filter(|_| before.contains(':'))
                .map(|f| {
                    ["pub(super) ", "pub(crate) ", "pub "]
                        .iter()
                        .fold(f.trim(), |f, vis| f.trim_start_matches(vis))
                        .trim()
                        .to_string()
                });
            let from_field = args
                .split(['.', '(', ')', ',', ' ', '\n'])
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0] == "m" || w[0] == "self")
                .map(|w| w[1].to_string());
            let declared = |field: &str| {
                src.lines()
                    .map(str::trim)
                    .map(|l| {
                        ["pub(super) ", "pub(crate) ", "pub "]
                            .iter()
                            .fold(l, |l, vis| l.trim_start_matches(vis))
                    })
                    .find(|l| l.starts_with(&format!("{field}:")) && !l.contains("domain("))
                    .and_then(type_keyword)
            };
            let kind = type_keyword(&args)
                .or_else(|| from_field.as_deref().and_then(declared))
                .or_else(|| assigned.as_deref().and_then(declared))
                .with_context(|| {
                    format!("no metric type found for {name} in {}", file.display())
                })?;
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        }
    }
    Ok(out)
}

/// What the dashboard check found.
#[derive(Debug, Default)]
struct DashboardReport {
    /// Names with samples stored by Prometheus.
    scraped: BTreeSet<String>,
    /// Names only declared (`# TYPE`) by a binary: no series yet.
    registered_only: BTreeSet<String>,
}

/// Every metric name of the dashboard's queries must be `scraped` (stored by Prometheus) or
/// `registered` (declared by a binary's exposition); else an error naming the unknown ones
/// and the panel queries they occur in.
fn check_dashboard(
    dashboard: &Value,
    scraped: &BTreeSet<String>,
    registered: &BTreeSet<String>,
) -> Result<DashboardReport> {
    let mut report = DashboardReport::default();
    let mut unknown: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let queries = dashboard_queries(dashboard);
    ensure!(!queries.is_empty(), "the dashboard has no PromQL queries");
    for q in &queries {
        let names = promql_metric_names(q);
        ensure!(!names.is_empty(), "no metric name in query {q:?}");
        for name in names {
            if scraped.contains(&name) {
                report.scraped.insert(name);
            } else if registered.contains(&name) {
                report.registered_only.insert(name);
            } else {
                unknown.entry(name).or_default().push(q.clone());
            }
        }
    }
    if !unknown.is_empty() {
        let lines: Vec<String> = unknown
            .iter()
            .map(|(n, qs)| format!("  {n}  (in {})", qs.join(" | ")))
            .collect();
        bail!(
            "metrics used by the dashboard that no binary exposes:\n{}",
            lines.join("\n")
        );
    }
    Ok(report)
}

fn dashboard_path() -> PathBuf {
    repo_root().join("deploy/grafana/tendril-dashboard.json")
}

fn load_dashboard() -> Result<Value> {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[test]
fn promql_metric_names_are_extracted() {
    let names = |e: &str| promql_metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (controller, le) (rate(controller_runtime_reconcile_time_seconds_bucket{job="tendril-operator", controller=~"$controller"}[$__rate_interval])))"#
        ),
        ["controller_runtime_reconcile_time_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum(rate(a_sum[5m])) / ignoring (le) sum without (x) (rate(a_count[1h30m] offset 5m)) > bool 0.5e3"
        ),
        ["a_count", "a_sum"]
    );
    assert_eq!(
        names(r#"up{job=~"a|b"} == 1 and on (instance) leader_election_master_status"#),
        ["leader_election_master_status", "up"]
    );
    assert_eq!(
        names(
            r#"max by (node, map) (tendril_bpf_map_pressure{node=~"${node}", map!="x{y}"}) > .9"#
        ),
        ["tendril_bpf_map_pressure"]
    );
    assert_eq!(names("workqueue_depth"), ["workqueue_depth"]);
    assert_eq!(
        names("topk(3, sum by(reason)(increase(tendril_datapath_drops_total[1m]))) # drops"),
        ["tendril_datapath_drops_total"]
    );
    assert!(names(r#"vector(1) + time()"#).is_empty());
    assert_eq!(
        names("ns:tendril_drops:rate5m * on(node) group_left(pod) kube_pod_info"),
        ["kube_pod_info", "ns:tendril_drops:rate5m"]
    );
}

#[test]
fn registered_families_expand_to_sample_names() {
    let text = "# HELP a x\n# TYPE a counter\n# TYPE b histogram\n# TYPE c gauge\n\
                # TYPE d info\nc 1\n# EOF\n";
    let got: Vec<String> = registered_sample_names(text).into_iter().collect();
    assert_eq!(
        got,
        ["a_total", "b_bucket", "b_count", "b_sum", "c", "d_info"]
    );
}

/// The dashboard is a Grafana dashboard with a Prometheus data source variable that every
/// panel uses, and has a panel for each thing an operator of Tendril must see.
#[test]
fn dashboard_is_well_formed_and_complete() -> Result<()> {
    let d = load_dashboard()?;
    let schema = d["schemaVersion"].as_u64().context("schemaVersion")?;
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert_eq!(d["uid"], "tendril-overview");
    let vars = d["templating"]["list"].as_array().context("templating")?;
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .context("no data source variable")?;
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().context("variable name")?);
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in d["panels"].as_array().context("panels")? {
        assert!(
            ids.insert(p["id"].as_u64().context("panel id")?),
            "duplicate id: {p}"
        );
        if p["type"] == "row" {
            continue;
        }
        titles.push(p["title"].as_str().unwrap_or_default().to_string());
        assert_eq!(
            p["datasource"]["uid"],
            ds_ref.as_str(),
            "panel {}",
            p["title"]
        );
        let targets = p["targets"].as_array().context("targets")?;
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"],
                ds_ref.as_str(),
                "panel {}",
                p["title"]
            );
        }
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
        assert!(x + w <= 24, "panel {} is off the grid: {g}", p["title"]);
    }
    // The families each required panel is about.
    let all: BTreeSet<String> = dashboard_queries(&d)
        .iter()
        .flat_map(|q| promql_metric_names(q))
        .collect();
    for needed in [
        "controller_runtime_reconcile_total",
        "controller_runtime_reconcile_errors_total",
        "controller_runtime_reconcile_time_seconds_bucket",
        "workqueue_depth",
        "leader_election_master_status",
        "tendril_identities",
        "tendril_ipam_cidrs_allocated",
        "tendril_ipam_cidrs_available",
        "tendril_agent_ips_in_use",
        "tendril_bpf_map_pressure",
        "tendril_datapath_drops_total",
        "tendril_datapath_realize_seconds_bucket",
    ] {
        assert!(all.contains(needed), "no panel queries {needed}");
    }
    let p99 = dashboard_queries(&d)
        .into_iter()
        .filter(|q| q.starts_with("histogram_quantile(0.99"))
        .count();
    assert!(p99 >= 2, "p99 panels for reconcile and realize latency");
    println!("{} panels: {}", titles.len(), titles.join(", "));
    Ok(())
}

// ------------------------------------------------------------------ Prometheus server

/// A Prometheus server on a free loopback port, with a temporary data directory; stopped
/// and removed on drop.
struct Prometheus {
    process: Option<Process>,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus with `hack/prometheus/prometheus.yml` and these file_sd targets.
    async fn start(operator: &[u16], agents: &[(u16, &str)]) -> Result<Prometheus> {
        let dir = std::env::temp_dir().join(unique_name("prometheus"));
        let mut prom = Prometheus {
            process: None,
            dir: dir.clone(),
            port: std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port(),
        };
        std::fs::create_dir_all(dir.join("targets"))?;
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::copy(
            repo_root().join("hack/prometheus/prometheus.yml"),
            dir.join("prometheus.yml"),
        )?;
        let op: Vec<String> = operator.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        std::fs::write(
            dir.join("targets/operator.json"),
            serde_json::to_vec(&json!([{ "targets": op }]))?,
        )?;
        let ag: Vec<Value> = agents
            .iter()
            .map(|(p, node)| json!({"targets": [format!("127.0.0.1:{p}")], "labels": {"node": node}}))
            .collect();
        std::fs::write(dir.join("targets/agents.json"), serde_json::to_vec(&ag)?)?;
        let mut process = Process::builder(Process::which("prometheus"))
            .name(format!("prometheus-{}", prom.port))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", prom.port))
            .args(["--log.level=info", "--storage.tsdb.retention.time=1h"])
            .spawn()?;
        process
            .wait_for_log("Server is ready to receive web requests", TIMEOUT)
            .await?;
        prom.process = Some(process);
        Ok(prom)
    }

    /// `GET /api/v1/{path}`: the `data` of a successful answer.
    async fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = http_get(self.port, &format!("/api/v1/{path}")).await?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("/api/v1/{path} returned {status}: {body}"))?;
        ensure!(
            status == 200 && v["status"] == "success",
            "/api/v1/{path}: {status} {body}"
        );
        Ok(v["data"].clone())
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let data = self
            .api(&format!("query?query={}", url_encode(promql)))
            .await?;
        ensure!(data["resultType"] == "vector", "not a vector: {data}");
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `promql` returns at least one series (Prometheus scrapes every second),
    /// and returns them.
    async fn series(&self, promql: &str) -> Result<Vec<Value>> {
        eventually(TIMEOUT, || async move {
            let r = self.query(promql).await?;
            ensure!(!r.is_empty(), "no series for {promql}");
            Ok(r)
        })
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn value_of(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn label<'a>(series: &'a Value, name: &str) -> &'a str {
    series["metric"][name].as_str().unwrap_or_default()
}

// ------------------------------------------------------------------ the cluster

#[tokio::test]
async fn prometheus_scrapes_operator_and_agents_and_dashboard_metrics_exist() -> Result<()> {
    let plane = ControlPlane::dedicated("prometheus").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let cluster = format!(
        "{}-{}",
        std::process::id(),
        rand::rng().random_range(0..9999)
    );
    let _underlay = Underlay::new(&cluster).await?;
    env.apply_yaml(
        "apiVersion: tendril.dev/v1alpha1\nkind: PodIPPool\nmetadata: {name: default}\n\
         spec: {ipv4: {cidrs: [\"10.201.0.0/23\"], maskSize: 24}}",
    )
    .await?;
    env.delete_on_drop::<tendril_crds::v1alpha1::PodIPPool>("default");

    // The operator as deployed: leader election on (the Lease in the test's namespace).
    let operator_port = free_port()?;
    let _operator = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--config")
        .arg(repo_root().join("config/operator.yaml"))
        .args(["--leader-elect", "--lease-name", LEASE])
        .args(["--lease-namespace", env.namespace()])
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{operator_port}"))
        .env("RUST_LOG", "info")
        .spawn()?;
    eventually(TIMEOUT, || async move {
        let (status, body) = http_get(operator_port, "/readyz").await?;
        ensure!(status == 200, "operator /readyz {status}: {body}");
        Ok(())
    })
    .await?;

    let mut nodes = Vec::new();
    for i in 0..2 {
        nodes.push(SimNode::start(&env, &cluster, 0, i).await?);
    }
    for n in &nodes {
        n.wait_ready(&client).await?;
    }
    let app = BTreeMap::from([("app".to_string(), "web".to_string())]);
    let mut pods = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        pods.push(
            SimPod::run(
                &client,
                n.handle(),
                env.namespace(),
                &format!("web-{i}"),
                &app,
            )
            .await?,
        );
    }
    // Cross-node traffic, so the datapath counters have series.
    let target: IpAddr = pods[1].ips[0];
    eventually(TIMEOUT, || async {
        ensure!(pods[0].ping(target).await?, "web-0 cannot ping {target}");
        Ok(())
    })
    .await?;
    for n in &nodes {
        n.wait_ips_in_use(1.0).await?;
    }
    // The pool holds two blocks: a third Node exhausts it (an event the IPAM panel shows).
    let spare = env.unique_name("spare");
    env.delete_on_drop::<k8s_openapi::api::core::v1::Node>(&spare);
    env.delete_on_drop::<tendril_crds::v1alpha1::NodeNetwork>(&spare);
    ensure_node_object(&client, &spare, "10.250.0.99".parse()?, &BTreeMap::new()).await?;

    let agents: Vec<(u16, &str)> = nodes
        .iter()
        .map(|n| (n.metrics_port, n.name.as_str()))
        .collect();
    let prom = Prometheus::start(&[operator_port], &agents).await?;

    // Every target is discovered and up.
    let targets = eventually(TIMEOUT, || async {
        let data = prom.api("targets?state=active").await?;
        let active = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(active.len() == 3, "{} active targets: {data}", active.len());
        for t in &active {
            ensure!(
                t["health"] == "up",
                "target {} is {}: {}",
                t["scrapeUrl"],
                t["health"],
                t["lastError"]
            );
        }
        Ok(active)
    })
    .await?;
    let jobs: BTreeSet<&str> = targets
        .iter()
        .filter_map(|t| t["labels"]["job"].as_str())
        .collect();
    assert_eq!(jobs, BTreeSet::from(["tendril-agent", "tendril-operator"]));
    for t in &targets {
        assert_eq!(t["lastError"], "", "{t}");
    }

    // It parsed OpenMetrics: family metadata under OpenMetrics names (the counter family
    // without `_total`) and the `info` type, which the classic text parser rejects.
    let meta = eventually(TIMEOUT, || async {
        let m = prom.api("metadata").await?;
        ensure!(
            m.get("controller_runtime_reconcile").is_some(),
            "no metadata yet: {m}"
        );
        ensure!(
            m.get("tendril_build").is_some(),
            "no tendril_build metadata yet"
        );
        Ok(m)
    })
    .await?;
    assert_eq!(
        meta["controller_runtime_reconcile"][0]["type"], "counter",
        "{meta}"
    );
    assert_eq!(meta["tendril_build"][0]["type"], "info", "{meta}");
    assert_eq!(
        meta["controller_runtime_reconcile_time_seconds"][0]["type"],
        "histogram"
    );

    // controller-runtime families with their labels.
    let op = r#"job="tendril-operator""#;
    let reconciles = prom
        .series(&format!(
            r#"controller_runtime_reconcile_total{{{op},controller="nodes",result="success"}} > 0"#
        ))
        .await?;
    assert_eq!(
        label(&reconciles[0], "instance"),
        format!("127.0.0.1:{operator_port}")
    );
    let controllers: BTreeSet<String> = prom
        .series(&format!(r#"controller_runtime_reconcile_total{{{op}}}"#))
        .await?
        .iter()
        .map(|s| label(s, "controller").to_string())
        .collect();
    for c in ["nodes", "ipam", "endpoints", "identities"] {
        assert!(
            controllers.contains(c),
            "no reconcile series of {c}: {controllers:?}"
        );
    }
    let results: BTreeSet<String> = prom
        .series(r#"controller_runtime_reconcile_total{controller="nodes"}"#)
        .await?
        .iter()
        .map(|s| label(s, "result").to_string())
        .collect();
    assert_eq!(
        results,
        BTreeSet::from(["error".into(), "requeue".into(), "success".into()])
    );
    prom.series(&format!(
        r#"controller_runtime_reconcile_time_seconds_bucket{{{op},controller="nodes",le="+Inf"}} > 0"#
    ))
    .await?;
    let depth = prom
        .series(&format!(r#"workqueue_depth{{{op},name="nodes"}}"#))
        .await?;
    assert!(value_of(&depth[0]) >= 0.0);
    prom.series(&format!(r#"workqueue_adds_total{{{op},name="nodes"}} > 0"#))
        .await?;
    prom.series(&format!(
        r#"workqueue_work_duration_seconds_count{{{op},name="ipam"}} > 0"#
    ))
    .await?;
    let leader = prom
        .series(&format!(
            r#"leader_election_master_status{{{op},name="{LEASE}"}} == 1"#
        ))
        .await?;
    assert_eq!(leader.len(), 1, "{leader:?}");

    // tendril_ metrics of the operator…
    prom.series(&format!(r#"tendril_nodes{{{op}}} == 3"#))
        .await?;
    prom.series(&format!(
        r#"tendril_ipam_cidrs_allocated{{{op},pool="default",family="ipv4"}} == 2"#
    ))
    .await?;
    prom.series(&format!(
        r#"tendril_ipam_cidrs_available{{{op},pool="default",family="ipv4"}} == 0"#
    ))
    .await?;
    prom.series(&format!(
        r#"tendril_ipam_exhaustions_total{{{op},pool="default",family="ipv4"}} >= 1"#
    ))
    .await?;
    prom.series(&format!(
        r#"tendril_identities{{{op},type="reserved"}} > 0"#
    ))
    .await?;
    prom.series(&format!(
        r#"tendril_identities{{{op},type="cluster"}} >= 1"#
    ))
    .await?;
    prom.series(&format!(r#"tendril_endpoint_writes_total{{{op}}} >= 2"#))
        .await?;
    // …and of every agent, labelled with its node.
    for n in &nodes {
        let ag = format!(r#"job="tendril-agent",node="{}""#, n.name);
        let ips = prom
            .series(&format!("tendril_agent_ips_in_use{{{ag}}}"))
            .await?;
        assert_eq!(value_of(&ips[0]), 1.0, "{ips:?}");
        prom.series(&format!("tendril_agent_ip_pool_size{{{ag}}} > 0"))
            .await?;
        prom.series(&format!(
            r#"tendril_agent_ip_allocations_total{{{ag},result="success"}} >= 1"#
        ))
        .await?;
        let maps: BTreeSet<String> = prom
            .series(&format!("tendril_bpf_map_pressure{{{ag}}}"))
            .await?
            .iter()
            .map(|s| label(s, "map").to_string())
            .collect();
        assert!(
            maps.contains("ipcache") && maps.contains("endpoints"),
            "{maps:?}"
        );
        prom.series(&format!(
            "tendril_datapath_realize_seconds_count{{{ag}}} > 0"
        ))
        .await?;
        prom.series(&format!(
            r#"tendril_bpf_map_operations_total{{{ag},outcome="success"}} > 0"#
        ))
        .await?;
        prom.series(&format!("tendril_datapath_packets_total{{{ag}}} > 0"))
            .await?;
    }
    // tendril_build_info from both binaries.
    let builds = prom.series("tendril_build_info").await?;
    let build_jobs: BTreeSet<&str> = builds.iter().map(|s| label(s, "job")).collect();
    assert_eq!(
        build_jobs,
        BTreeSet::from(["tendril-agent", "tendril-operator"])
    );
    assert!(builds.iter().all(|s| !label(s, "version").is_empty()));

    // ------------------------------------------------------------ the dashboard
    let scraped: BTreeSet<String> = prom
        .api("label/__name__/values")
        .await?
        .as_array()
        .context("label values")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut registered = registered_sample_names(&source_registered_families()?);
    for port in std::iter::once(operator_port).chain(nodes.iter().map(|n| n.metrics_port)) {
        let (status, body) = http_get(port, "/metrics").await?;
        ensure!(status == 200, "/metrics on {port}: {status}");
        registered.extend(registered_sample_names(&body));
    }
    let dashboard = load_dashboard()?;
    let report = check_dashboard(&dashboard, &scraped, &registered)?;
    println!(
        "dashboard: {} metric names stored by Prometheus: {}",
        report.scraped.len(),
        report
            .scraped
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "dashboard: {} registered by a binary but without a series yet (need an event): {}",
        report.registered_only.len(),
        report
            .registered_only
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(report.scraped.len() >= 15, "{report:?}");
    // Every registered-only name is one that needs an event this cluster did not have.
    for name in &report.registered_only {
        assert!(
            name.starts_with("tendril_datapath_drops")
                || name.starts_with("controller_runtime_reconcile_errors")
                || name.starts_with("tendril_watch_errors")
                || name.starts_with("tendril_identity_gc")
                || name.starts_with("tendril_agent_ip_leaks")
                // Per BGP peer: this cluster has no BGP router (bgp_router.rs reads them).
                || name.starts_with("tendril_bgp_prefixes")
                // Per reason of a gateway change: this cluster has no egress policy
                // (operator_egress reads them).
                || name.starts_with("tendril_egress_gateway_changes")
                // Per source of a lost flow: only an overloaded pipeline loses any
                // (flows_bench reads them).
                || name.starts_with("tendril_flows_lost")
                // Per reason of a dropped flow, like tendril_datapath_drops: only when the
                // datapath dropped something during the scrape window.
                || name.starts_with("tendril_flows_drops")
                || name.starts_with("workqueue_retries"),
            "{name} has no series although this cluster should have made one"
        );
    }
    // A misspelt name fails the check, naming it.
    let misspelt: Value = serde_json::from_str(&serde_json::to_string(&dashboard)?.replacen(
        "workqueue_depth",
        "workqueue_dpeth",
        1,
    ))?;
    let err = check_dashboard(&misspelt, &scraped, &registered)
        .expect_err("a misspelt metric name passed the check");
    assert!(err.to_string().contains("workqueue_dpeth"), "{err}");
    Ok(())
}

/// The families the source registers, as the dashboard check sees them.
#[test]
fn source_registrations_are_found_with_their_types() -> Result<()> {
    let types = source_registered_families()?;
    for line in [
        "# TYPE controller_runtime_reconcile counter",
        "# TYPE controller_runtime_reconcile_errors counter",
        "# TYPE controller_runtime_reconcile_time_seconds histogram",
        "# TYPE workqueue_depth gauge",
        "# TYPE leader_election_master_status gauge",
        "# TYPE tendril_build info",
        "# TYPE tendril_ipam_exhaustions counter",
        "# TYPE tendril_bpf_map_operations counter",
        "# TYPE tendril_bpf_map_pressure gauge",
        "# TYPE tendril_datapath_drops counter",
        "# TYPE tendril_datapath_realize_seconds histogram",
        "# TYPE tendril_agent_ips_in_use gauge",
    ] {
        assert!(
            types.lines().any(|l| l == line),
            "missing {line:?} in:\n{types}"
        );
    }
    print!("{types}");
    let names = registered_sample_names(&types);
    assert!(names.contains("controller_runtime_reconcile_errors_total"));
    assert!(!names.contains("controller_runtime_reconcile_errors"));
    Ok(())
}

/// The monitoring overlay ships the dashboard, unchanged, as a ConfigMap Grafana's
/// dashboard sidecar picks up.
#[test]
fn monitoring_overlay_ships_the_dashboard() -> Result<()> {
    let out = std::process::Command::new(tendril_e2e::k8s_bin_dir().join("kubectl"))
        .arg("kustomize")
        .arg(repo_root().join("deploy/kustomize/overlays/monitoring"))
        .output()?;
    ensure!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&rendered)?;
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "tendril-grafana-dashboard")
        .context("no tendril-grafana-dashboard ConfigMap in the monitoring overlay")?;
    assert_eq!(cm["metadata"]["namespace"], "tendril-system");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        cm["data"]["tendril-dashboard.json"]
            .as_str()
            .context("dashboard data")?,
    )?;
    assert_eq!(shipped, load_dashboard()?);
    Ok(())
}
