//! A tiny HTTP/1.0 client for loopback endpoints (`/metrics`, `/healthz`, `/readyz`) and a
//! parser for the Prometheus text and OpenMetrics formats.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET http://127.0.0.1:{port}{path}`: returns the status code and body. HTTP/1.0 so the
/// server answers with a plain body (never chunked) and closes the connection. Times out
/// after 10 s.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("malformed HTTP response from :{port}{path}: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .with_context(|| format!("no status line in response from :{port}{path}"))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("GET 127.0.0.1:{port}{path} timed out"))?
}

/// Fetches and parses `http://127.0.0.1:{port}/metrics`; fails unless the status is 200.
pub async fn fetch_metrics(port: u16) -> Result<Metrics> {
    let (status, body) = http_get(port, "/metrics").await?;
    if status != 200 {
        bail!("GET :{port}/metrics returned {status}: {body}");
    }
    Ok(Metrics::parse(&body))
}

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parsed metrics exposition (Prometheus text format or OpenMetrics). Sample names are as
/// written, so an OpenMetrics counter `foo` is found as `foo_total`.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// Samples named `name` whose labels include every `(key, value)` of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// Value of the first sample named `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next().map(|s| s.value)
    }

    /// Sum over every sample named `name` whose labels include `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) if line[..open].find(' ').is_none() => {
            let close = open + line[open..].find('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        _ => {
            let (n, r) = line.split_once(' ')?;
            (n, BTreeMap::new(), r)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        out.insert(key.trim().to_string(), val);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_and_classic_text() {
        let text = r#"# HELP controller_runtime_reconcile Total reconciliations.
# TYPE controller_runtime_reconcile counter
controller_runtime_reconcile_total{controller="nodes",result="success"} 7
controller_runtime_reconcile_total{controller="nodes",result="error"} 2
controller_runtime_reconcile_total{controller="endpoints",result="success"} 1
workqueue_depth{name="nodes"} 0
leader_election_master_status{name="tendril-operator"} 1
weird{path="a\"b,c=d"} 1.5e3
tendril_up 1
# EOF
"#;
        let m = Metrics::parse(text);
        assert_eq!(m.samples.len(), 7);
        assert_eq!(
            m.value(
                "controller_runtime_reconcile_total",
                &[("controller", "nodes"), ("result", "error")]
            ),
            Some(2.0)
        );
        assert_eq!(
            m.sum(
                "controller_runtime_reconcile_total",
                &[("controller", "nodes")]
            ),
            9.0
        );
        assert_eq!(m.sum("controller_runtime_reconcile_total", &[]), 10.0);
        assert_eq!(m.value("weird", &[("path", "a\"b,c=d")]), Some(1500.0));
        assert_eq!(m.value("tendril_up", &[]), Some(1.0));
        assert!(m.has("workqueue_depth"));
        assert!(!m.has("controller_runtime_reconcile"));
        assert_eq!(m.value("missing", &[]), None);
    }

    #[tokio::test]
    async fn http_get_reads_status_and_body_from_a_loopback_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nup 1\n")
                .await
                .unwrap();
            req
        });
        let m = fetch_metrics(port).await.unwrap();
        assert_eq!(m.value("up", &[]), Some(1.0));
        let req = server.await.unwrap();
        assert!(req.starts_with("GET /metrics HTTP/1.0\r\n"), "{req}");
    }
}
