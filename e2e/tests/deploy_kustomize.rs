//! `deploy/kustomize`: every overlay renders, with the kustomize of kubectl 1.36 (the
//! plane's) and of the machine's kubectl 1.32 (kustomize v5.5) alike; what it renders is what
//! the design promises (checked field by field); and the real apiserver accepts `dev`,
//! `production` and `monitoring` in a server-side dry run. The monitoring overlay is checked
//! against the Prometheus Operator's own CRDs, read from its Go module (the Go module proxy
//! is reachable, no container registry is), and its alert rules with `promtool`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::Value;
use tendril_e2e::{TestEnv, k8s_bin_dir, repo_root};
use tokio::process::Command;

const NAMESPACE: &str = "tendril-system";
/// The namespace of the BGP peers' password Secrets, where only the agent's Role for
/// them and its binding live (deploy/kustomize/base/bgp-secrets.yaml).
const BGP_SECRETS_NAMESPACE: &str = "tendril-bgp-secrets";
const BGP_SECRETS_ROLE: &str = "tendril-agent-bgp-secrets";
/// The namespace of the IPsec key Secrets, with the operator's and the agent's Roles there
/// (deploy/kustomize/base/ipsec-keys.yaml).
const IPSEC_KEYS_NAMESPACE: &str = "tendril-ipsec-keys";
const IPSEC_KEYS_ROLES: [&str; 2] = ["tendril-operator-ipsec-keys", "tendril-agent-ipsec-keys"];

/// The namespace `d` must land in: tendril-system, but for the Roles of the BGP secrets and
/// IPsec keys namespaces.
fn expected_namespace(d: &Value) -> &'static str {
    let kind = d["kind"].as_str().unwrap_or_default();
    let name = d["metadata"]["name"].as_str().unwrap_or_default();
    match kind {
        "Role" | "RoleBinding" if name == BGP_SECRETS_ROLE => BGP_SECRETS_NAMESPACE,
        "Role" | "RoleBinding" if IPSEC_KEYS_ROLES.contains(&name) => IPSEC_KEYS_NAMESPACE,
        _ => NAMESPACE,
    }
}
/// The Prometheus Operator release whose CRDs validate the monitoring overlay.
const PROMETHEUS_OPERATOR: &str = "github.com/prometheus-operator/prometheus-operator@v0.85.0";

fn overlay(name: &str) -> PathBuf {
    let dir = repo_root().join("deploy/kustomize");
    if name == "base" {
        dir.join("base")
    } else {
        dir.join("overlays").join(name)
    }
}

/// The plane's kubectl (1.36) and, where installed, the machine's (1.32, kustomize v5.5).
fn kubectls() -> Vec<PathBuf> {
    let mut out = vec![k8s_bin_dir().join("kubectl")];
    let system = PathBuf::from("/usr/bin/kubectl");
    if system.exists() {
        out.push(system);
    }
    out
}

async fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

async fn render_with(kubectl: &Path, dir: &Path) -> Result<String> {
    run(Command::new(kubectl).arg("kustomize").arg(dir)).await
}

/// Renders `name` with every kubectl and checks they agree; returns the documents.
async fn render(name: &str) -> Result<(String, Vec<Value>)> {
    let dir = overlay(name);
    let mut outputs = Vec::new();
    for kubectl in kubectls() {
        outputs.push((kubectl.clone(), render_with(&kubectl, &dir).await?));
    }
    let (first_kubectl, yaml) = outputs[0].clone();
    for (kubectl, other) in &outputs[1..] {
        ensure!(
            *other == yaml,
            "{} and {} render {name} differently",
            first_kubectl.display(),
            kubectl.display()
        );
    }
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&yaml).with_context(|| format!("parsing rendered {name}"))?;
    ensure!(!docs.is_empty(), "{name} renders nothing");
    // Every namespaced object, the overlay's own included, lands in tendril-system (the
    // agent's Role for the BGP password Secrets in their namespace).
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let cluster_scoped = matches!(
            kind,
            "Namespace"
                | "CustomResourceDefinition"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "PriorityClass"
        );
        if !cluster_scoped {
            let expected = expected_namespace(d);
            ensure!(
                d["metadata"]["namespace"] == expected,
                "{name}: {kind}/{} is not in {expected}",
                d["metadata"]["name"]
            );
        }
    }
    Ok((yaml, docs))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("{kind}/{name} not rendered"))
}

fn names_of(docs: &[Value], kind: &str) -> BTreeSet<String> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

fn container<'a>(workload: &'a Value, list: &str, name: &str) -> Result<&'a Value> {
    workload["spec"]["template"]["spec"][list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .ok_or_else(|| anyhow!("no {list} entry {name} in {}", workload["metadata"]["name"]))
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// Every CRD manifest of `crds/manifests/`, by name.
fn crd_names_in_repo() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(repo_root().join("crds/manifests"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
            let docs: Vec<Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(&path)?)?;
            names.extend(
                docs.iter()
                    .filter(|d| d["kind"] == "CustomResourceDefinition")
                    .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_string)),
            );
        }
    }
    Ok(names)
}

#[tokio::test]
async fn base_renders_what_the_design_promises() -> Result<()> {
    let (_, docs) = render("base").await?;

    // Every namespaced object lands in tendril-system (but the BGP secrets Role).
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let cluster_scoped = matches!(
            kind,
            "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding"
        );
        if !cluster_scoped {
            assert_eq!(
                d["metadata"]["namespace"],
                expected_namespace(d),
                "{kind}/{} namespace",
                d["metadata"]["name"]
            );
        }
    }
    find(&docs, "Namespace", NAMESPACE)?;
    find(&docs, "Namespace", BGP_SECRETS_NAMESPACE)?;
    find(&docs, "Namespace", IPSEC_KEYS_NAMESPACE)?;
    assert_eq!(
        names_of(&docs, "CustomResourceDefinition"),
        crd_names_in_repo()?,
        "the base installs every CRD"
    );
    for name in ["tendril-operator", "tendril-agent"] {
        find(&docs, "ServiceAccount", name)?;
        find(&docs, "ClusterRole", name)?;
        let binding = find(&docs, "ClusterRoleBinding", name)?;
        assert_eq!(binding["roleRef"]["name"], name);
        assert_eq!(binding["subjects"][0]["name"], name);
        assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    }

    // The ConfigMaps are config/*.yaml verbatim, under hash-suffixed names that the
    // workloads reference.
    let configmaps = names_of(&docs, "ConfigMap");
    for (workload_kind, workload_name, file) in [
        ("Deployment", "tendril-operator", "operator.yaml"),
        ("DaemonSet", "tendril-agent", "agent.yaml"),
    ] {
        let cm_name = configmaps
            .iter()
            .find(|n| n.starts_with(&format!("{workload_name}-config-")))
            .ok_or_else(|| anyhow!("no generated ConfigMap for {workload_name}"))?;
        let cm = find(&docs, "ConfigMap", cm_name)?;
        let on_disk = std::fs::read_to_string(repo_root().join("config").join(file))?;
        assert_eq!(
            cm["data"][file].as_str(),
            Some(on_disk.as_str()),
            "{cm_name} holds config/{file}"
        );
        let workload = find(&docs, workload_kind, workload_name)?;
        let volumes = workload["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            volumes
                .iter()
                .any(|v| v["configMap"]["name"] == cm_name.as_str()),
            "{workload_name} mounts {cm_name}"
        );
        // Every ConfigMap a workload mounts is rendered (the hash suffix propagated).
        for v in volumes
            .iter()
            .filter_map(|v| v["configMap"]["name"].as_str())
        {
            assert!(
                configmaps.contains(v),
                "{workload_name} mounts ConfigMap {v}, which is not rendered"
            );
        }
        let main = &workload["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(main["args"][0], format!("--config=/etc/tendril/{file}"));
    }

    // Operator: non-root, read-only root, no capabilities, probes on the metrics port.
    let op = find(&docs, "Deployment", "tendril-operator")?;
    let pod = &op["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tendril-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = container(op, "containers", "operator")?;
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        c["ports"][0]["containerPort"], 9963,
        "config/operator.yaml http.bindAddress port"
    );
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );

    // Agent: host network, every node, exactly its capabilities, the host paths it needs.
    let ds = find(&docs, "DaemonSet", "tendril-agent")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tendril-agent");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], false);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    let agent = container(ds, "containers", "agent")?;
    assert_eq!(agent["securityContext"]["privileged"], false);
    assert_eq!(agent["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        agent["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    let caps: BTreeSet<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        caps,
        BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"])
    );
    assert_eq!(
        agent["ports"][0]["containerPort"], 9962,
        "config/agent.yaml http.bindAddress port"
    );
    assert_eq!(agent["env"][0]["name"], "TENDRIL_NODE_NAME");
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let host_paths: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter_map(|v| v["hostPath"]["path"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        host_paths,
        BTreeSet::from([
            "/sys/fs/bpf",
            "/var/run/tendril",
            "/var/run/netns",
            "/opt/cni/bin",
            "/etc/cni/net.d"
        ])
    );
    let bpf_mount = |c: &Value| -> Option<String> {
        c["volumeMounts"]
            .as_array()?
            .iter()
            .find(|m| m["mountPath"] == "/sys/fs/bpf")?["mountPropagation"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(bpf_mount(agent).as_deref(), Some("HostToContainer"));
    // Only the bpffs mounter is privileged: Bidirectional propagation requires it.
    let mount = container(ds, "initContainers", "mount-bpf-fs")?;
    assert_eq!(mount["securityContext"]["privileged"], true);
    assert_eq!(bpf_mount(mount).as_deref(), Some("Bidirectional"));
    let install = container(ds, "initContainers", "install-cni")?;
    assert_eq!(
        install["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    let script = install["command"][3].as_str().unwrap_or_default();
    assert!(
        script.contains("/host/opt/cni/bin/tendril-cni") && script.contains("05-tendril.conflist")
    );

    // The conflist is valid CNI configuration naming the plugin and the agent's socket.
    let cni_cm = configmaps
        .iter()
        .find(|n| n.starts_with("tendril-cni-config-"))
        .ok_or_else(|| anyhow!("no tendril-cni-config ConfigMap"))?;
    let conflist: Value = serde_json::from_str(
        find(&docs, "ConfigMap", cni_cm)?["data"]["05-tendril.conflist"]
            .as_str()
            .unwrap_or_default(),
    )?;
    assert_eq!(conflist["plugins"][0]["type"], "tendril-cni");
    let agent_config: Value = serde_saphyr::from_str(&std::fs::read_to_string(
        repo_root().join("config/agent.yaml"),
    )?)?;
    assert_eq!(
        conflist["plugins"][0]["agentSocket"],
        agent_config["cniSocket"]
    );

    // Metrics Services select the workloads' pods and expose their metrics ports.
    for (svc, port) in [
        ("tendril-operator-metrics", 9963),
        ("tendril-agent-metrics", 9962),
    ] {
        let s = find(&docs, "Service", svc)?;
        assert_eq!(s["spec"]["ports"][0]["port"], port);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], "metrics");
    }
    Ok(())
}

#[tokio::test]
async fn dev_overlay_runs_one_local_image_replica_with_debug_logs() -> Result<()> {
    let (_, docs) = render("dev").await?;
    let op = find(&docs, "Deployment", "tendril-operator")?;
    assert_eq!(op["spec"]["replicas"], 1);
    let c = container(op, "containers", "operator")?;
    assert_eq!(c["image"], "localhost/tendril/operator:dev");
    assert_eq!(env_value(c, "TENDRIL_LEADER_ELECT"), Some("false"));
    assert!(env_value(c, "TENDRIL_LOG_LEVEL").is_some_and(|l| l.contains("debug")));
    let ds = find(&docs, "DaemonSet", "tendril-agent")?;
    for (list, name) in [
        ("containers", "agent"),
        ("initContainers", "mount-bpf-fs"),
        ("initContainers", "install-cni"),
    ] {
        let c = container(ds, list, name)?;
        assert_eq!(c["image"], "localhost/tendril/agent:dev", "{name}");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent", "{name}");
    }
    assert!(
        env_value(container(ds, "containers", "agent")?, "TENDRIL_LOG_LEVEL")
            .is_some_and(|l| l.contains("debug"))
    );
    Ok(())
}

#[tokio::test]
async fn production_overlay_is_highly_available() -> Result<()> {
    let (_, docs) = render("production").await?;
    let op = find(&docs, "Deployment", "tendril-operator")?;
    assert_eq!(op["spec"]["replicas"], 2);
    let pod = &op["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        anti["labelSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "tendril-operator"
    );
    let c = container(op, "containers", "operator")?;
    assert_eq!(env_value(c, "TENDRIL_LEADER_ELECT"), Some("true"));
    assert!(
        c["resources"]["limits"]["cpu"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    let pdb = find(&docs, "PodDisruptionBudget", "tendril-operator")?;
    assert_eq!(pdb["metadata"]["namespace"], NAMESPACE);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], op["spec"]["selector"]["matchLabels"],
        "the PDB guards the operator's pods"
    );
    let ds = find(&docs, "DaemonSet", "tendril-agent")?;
    assert_eq!(
        ds["spec"]["template"]["spec"]["priorityClassName"],
        "system-node-critical"
    );
    let agent = container(ds, "containers", "agent")?;
    assert!(agent["resources"]["limits"]["memory"].is_string());
    assert_eq!(env_value(agent, "TENDRIL_LOG_FORMAT"), Some("json"));
    Ok(())
}

#[tokio::test]
async fn monitoring_overlay_scrapes_both_binaries_and_alerts() -> Result<()> {
    let (_, docs) = render("monitoring").await?;
    let sm = find(&docs, "ServiceMonitor", "tendril-operator")?;
    let svc = find(&docs, "Service", "tendril-operator-metrics")?;
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the operator's metrics Service"
        );
    }
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        svc["spec"]["ports"][0]["name"]
    );
    let pm = find(&docs, "PodMonitor", "tendril-agent")?;
    let ds = find(&docs, "DaemonSet", "tendril-agent")?;
    for (k, v) in pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(
            &ds["spec"]["template"]["metadata"]["labels"][k], v,
            "the PodMonitor selects the agents"
        );
    }
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    let rule = find(&docs, "PrometheusRule", "tendril")?;
    let alerts: BTreeSet<&str> = rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for wanted in [
        "TendrilReconcileErrors",
        "TendrilOperatorLeaderMissing",
        "TendrilBPFMapPressure",
        "TendrilDropSpike",
        "TendrilUnrealizedRevisions",
        "TendrilBPFMapWriteFailures",
        "TendrilSlowRealize",
    ] {
        assert!(
            alerts.contains(wanted),
            "alert {wanted} missing from {alerts:?}"
        );
    }
    Ok(())
}

/// The alert rules are valid PromQL and behave as intended: `promtool check rules` and
/// `promtool test rules` (deploy/kustomize/overlays/monitoring/alerts_test.yaml) on the
/// rules exactly as the overlay renders them.
#[tokio::test]
async fn monitoring_alerts_pass_promtool() -> Result<()> {
    let (_, docs) = render("monitoring").await?;
    let rule = find(&docs, "PrometheusRule", "tendril")?;
    let dir = tempdir("promtool")?;
    let rules = dir.path.join("tendril-rules.yaml");
    std::fs::write(&rules, serde_json::to_string_pretty(&rule["spec"])?)?;
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules))
    .await?;
    assert!(out.contains("SUCCESS"), "promtool check rules: {out}");
    let tests = dir.path.join("alerts_test.yaml");
    std::fs::copy(overlay("monitoring").join("alerts_test.yaml"), &tests)?;
    let out = run(Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&tests)
        .current_dir(&dir.path))
    .await?;
    assert!(out.contains("SUCCESS"), "promtool test rules: {out}");
    Ok(())
}

/// Every metric the alerts use is one the code registers (by its registered name; counters
/// get `_total`, histograms `_bucket`/`_sum`/`_count`).
#[tokio::test]
async fn alerts_use_only_metrics_the_code_exports() -> Result<()> {
    let (_, docs) = render("monitoring").await?;
    let rule = find(&docs, "PrometheusRule", "tendril")?;
    let mut sources = String::new();
    for dir in ["runtime/src", "controllers/src", "datapath/src"] {
        collect_sources(&repo_root().join(dir), &mut sources)?;
    }
    let mut missing = Vec::new();
    for group in rule["spec"]["groups"].as_array().into_iter().flatten() {
        for r in group["rules"].as_array().into_iter().flatten() {
            let expr = r["expr"].as_str().unwrap_or_default();
            for metric in metric_names(expr) {
                let base = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s))
                    .unwrap_or(&metric);
                if !sources.contains(&format!("\"{base}\""))
                    && !sources.contains(&format!("\"{metric}\""))
                {
                    missing.push(format!("{metric} (alert {})", r["alert"]));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "alerts use metrics no code registers: {missing:?}"
    );
    Ok(())
}

fn collect_sources(dir: &Path, out: &mut String) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_sources(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    Ok(())
}

/// Metric names in a PromQL expression: the identifiers with the prefixes of the metrics
/// Tendril exports, outside quoted label values.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::new();
    let mut in_quote = false;
    for c in expr.chars() {
        if c == '"' {
            in_quote = !in_quote;
        } else if !in_quote {
            unquoted.push(c);
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            [
                "controller_runtime_",
                "workqueue_",
                "leader_election_",
                "tendril_",
            ]
            .iter()
            .any(|p| t.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

/// A directory removed on drop.
struct TempDir {
    path: PathBuf,
}

fn tempdir(prefix: &str) -> Result<TempDir> {
    let path = std::env::temp_dir().join(tendril_e2e::unique_name(prefix));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir { path })
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What each overlay sets (arguments, environment) is accepted by the real binaries and has
/// the intended effect: each workload's container command line and literal environment are
/// run with `--print-config` (the mounted config path mapped to `config/`, `fieldRef`
/// variables given sample values), and the effective configuration is checked.
#[tokio::test]
async fn overlay_settings_are_accepted_by_the_binaries() -> Result<()> {
    for name in ["base", "dev", "production", "monitoring"] {
        let (_, docs) = render(name).await?;
        let op = effective_config(
            find(&docs, "Deployment", "tendril-operator")?,
            "operator",
            "tendril-operator",
        )
        .await?;
        let agent = effective_config(
            find(&docs, "DaemonSet", "tendril-agent")?,
            "agent",
            "tendril-agent",
        )
        .await?;
        assert_eq!(
            agent["nodeName"], "sample-node",
            "{name}: the agent's node name comes from spec.nodeName"
        );
        assert_eq!(
            agent["stateDir"], "/var/run/tendril",
            "{name}: state dir is the hostPath mount"
        );
        assert_eq!(op["leaderElection"]["leaseNamespace"], NAMESPACE, "{name}");
        match name {
            "dev" => {
                assert_eq!(
                    op["leaderElection"]["enabled"], false,
                    "dev: one replica, no election"
                );
                for c in [&op, &agent] {
                    assert!(
                        c["logging"]["level"]
                            .as_str()
                            .is_some_and(|l| l.contains("=debug")),
                        "dev: {c}"
                    );
                }
            }
            "production" => {
                assert_eq!(op["leaderElection"]["enabled"], true);
                assert_eq!(op["logging"]["format"], "json");
                assert_eq!(agent["logging"]["format"], "json");
            }
            _ => {
                assert_eq!(op["leaderElection"]["enabled"], true, "{name}");
                assert_eq!(op["logging"]["level"], "info", "{name}");
            }
        }
    }
    Ok(())
}

/// Runs `binary --print-config` with the container's arguments and literal environment.
async fn effective_config(workload: &Value, container_name: &str, binary: &str) -> Result<Value> {
    let c = container(workload, "containers", container_name)?;
    let config_dir = repo_root().join("config");
    let args: Vec<String> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|a| a.replace("/etc/tendril/", &format!("{}/", config_dir.display())))
        .collect();
    let mut cmd = Command::new(tendril_e2e::target_bin_dir().join(binary));
    cmd.args(&args).arg("--print-config");
    // Only what the manifest sets: no TENDRIL_* or RUST_LOG of the test's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("TENDRIL_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let key = e["name"].as_str().unwrap_or_default();
        let value = match (
            &e["value"],
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Value::String(v), _) => v.clone(),
            (_, Some("spec.nodeName")) => "sample-node".into(),
            (_, Some("metadata.name")) => "sample-pod".into(),
            other => bail!("{binary}: env {key} has a source this test does not know: {other:?}"),
        };
        cmd.env(key, value);
    }
    let out = run(&mut cmd)
        .await
        .with_context(|| format!("{binary} {args:?}"))?;
    serde_saphyr::from_str(&out).with_context(|| format!("parsing {binary} --print-config:\n{out}"))
}

/// `tendril-system` exists on the shared plane (namespaced objects cannot be dry-run into a
/// namespace that does not). Created if missing and left in place: it is the install's
/// namespace, other tests may use it at the same time, and it holds nothing of ours.
/// The same for tendril-bgp-secrets and tendril-ipsec-keys (Roles there).
async fn ensure_install_namespace(env: &TestEnv) -> Result<()> {
    let api: Api<Namespace> = env.cluster_api();
    for name in [NAMESPACE, BGP_SECRETS_NAMESPACE, IPSEC_KEYS_NAMESPACE] {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `kubectl apply --server-side --dry-run=server` of the rendered overlay with kubectl 1.36;
/// every object must come back as applied.
async fn server_dry_run(env: &TestEnv, name: &str) -> Result<()> {
    let (yaml, docs) = render(name).await?;
    ensure_install_namespace(env).await?;
    let dir = tempdir(&format!("dry-run-{name}"))?;
    let file = dir.path.join("rendered.yaml");
    std::fs::write(&file, &yaml)?;
    let out = env
        .plane()
        .kubectl([
            "apply".as_ref(),
            "--server-side".as_ref(),
            "--force-conflicts".as_ref(),
            "--field-manager=tendril-e2e-dry-run".as_ref(),
            "--dry-run=server".as_ref(),
            "-f".as_ref(),
            file.as_os_str(),
        ])
        .await?;
    let applied: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with("serverside-applied (server dry run)"))
        .collect();
    assert_eq!(
        applied.len(),
        docs.len(),
        "every object of {name} accepted by the apiserver:\n{out}"
    );
    Ok(())
}

#[tokio::test]
async fn dev_overlay_passes_server_dry_run() -> Result<()> {
    let env = TestEnv::new().await?;
    server_dry_run(&env, "dev").await
}

#[tokio::test]
async fn production_overlay_passes_server_dry_run() -> Result<()> {
    let env = TestEnv::new().await?;
    server_dry_run(&env, "production").await
}

/// The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule) come from its
/// Go module (`go mod download`: module zips are plain source trees; the CRDs live in
/// `example/prometheus-operator-crd/`). They are installed for real on the shared plane
/// (cluster-scoped, idempotent, nothing else defines these kinds) so the dry run validates
/// the monitors and rules against their real schemas.
#[tokio::test]
async fn monitoring_overlay_passes_server_dry_run_against_prometheus_operator_crds() -> Result<()> {
    let env = TestEnv::new().await?;
    let dir = prometheus_operator_dir().await?;
    for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
        let path = dir.join(format!(
            "example/prometheus-operator-crd/monitoring.coreos.com_{kind}.yaml"
        ));
        env.plane()
            .kubectl([
                "apply".as_ref(),
                "--server-side".as_ref(),
                "--force-conflicts".as_ref(),
                "-f".as_ref(),
                path.as_os_str(),
            ])
            .await?;
        env.plane()
            .kubectl([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{kind}.monitoring.coreos.com"),
            ])
            .await?;
    }
    server_dry_run(&env, "monitoring").await
}

/// The module's directory in the Go module cache, downloaded through the Go module proxy
/// on first use.
async fn prometheus_operator_dir() -> Result<PathBuf> {
    let go = ["/usr/local/go/bin/go", "/usr/bin/go"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("the go command is needed to fetch the Prometheus Operator CRDs"))?;
    let out = run(Command::new(go)
        .args(["mod", "download", "-json", PROMETHEUS_OPERATOR])
        .current_dir(std::env::temp_dir()))
    .await?;
    let info: Value = serde_json::from_str(&out)?;
    let dir = info["Dir"]
        .as_str()
        .ok_or_else(|| anyhow!("go mod download gave no Dir: {out}"))?;
    Ok(PathBuf::from(dir))
}
