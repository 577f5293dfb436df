//! The test control plane is a real one: the right version, kubectl works, CRDs install, the
//! controller-manager's controllers run, and the fault-injection plane restarts cleanly.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Node, NodeAddress, NodeCondition, NodeStatus, Pod, PodCondition,
    PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use tendril_e2e::{
    Component, ControlPlane, FIELD_MANAGER, TestEnv, eventually, http_get, wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn apiserver_reports_the_built_version() -> Result<()> {
    let env = TestEnv::new().await?;
    let v = env.client().apiserver_version().await?;
    assert_eq!(v.git_version, "v1.36.3");
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "36"));
    Ok(())
}

#[tokio::test]
async fn kubectl_works_against_the_plane() -> Result<()> {
    let env = TestEnv::new().await?;
    let out = env
        .plane()
        .kubectl(["get", "namespace", env.namespace(), "-o", "name"])
        .await?;
    assert_eq!(out.trim(), format!("namespace/{}", env.namespace()));
    let version = env.plane().kubectl(["version", "-o", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&version)?;
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.36.3");
    assert_eq!(v["clientVersion"]["gitVersion"], "v1.36.3");
    Ok(())
}

/// Every manifest in crds/manifests is accepted (a non-structural schema would fail the
/// apply), Established, and reachable through `kubectl get tendril`.
#[tokio::test]
async fn every_crd_manifest_is_established_and_in_the_tendril_category() -> Result<()> {
    let env = TestEnv::new().await?;
    let crds: Api<CustomResourceDefinition> = env.cluster_api();
    let dir = tendril_e2e::repo_root().join("crds/manifests");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("parsing {}", path.display()))?;
        names.push(crd.metadata.name.expect("CRD name"));
    }
    assert!(!names.is_empty(), "no CRD manifests in {}", dir.display());
    for name in &names {
        let crd = wait_for(&crds, name, conditions::is_crd_established(), TIMEOUT)
            .await?
            .expect("established CRD exists");
        assert!(
            crd.spec
                .names
                .categories
                .as_ref()
                .is_some_and(|c| c.iter().any(|c| c == "tendril")),
            "{name} is not in the tendril category"
        );
    }
    // `kubectl get tendril` resolves the category through discovery.
    env.plane()
        .kubectl(["get", "tendril", "-A", "-o", "name"])
        .await?;
    let resources = env
        .plane()
        .kubectl(["api-resources", "--categories=tendril", "-o", "name"])
        .await?;
    for name in &names {
        assert!(
            resources.lines().any(|l| l == name),
            "{name} missing from:\n{resources}"
        );
    }
    Ok(())
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Nothing but the real endpointslice controller writes EndpointSlices here: a Service's slice
/// listing a Ready pod's IP proves the controller-manager runs against this apiserver.
#[tokio::test]
async fn endpointslice_controller_publishes_ready_pods_of_a_service() -> Result<()> {
    let env = TestEnv::new().await?;
    let client = env.client();

    let node_name = env.unique_name("node");
    env.delete_on_drop::<Node>(&node_name);
    let nodes: Api<Node> = env.cluster_api();
    nodes
        .create(
            &PostParams::default(),
            &Node {
                metadata: ObjectMeta {
                    name: Some(node_name.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    nodes
        .patch_status(
            &node_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "status": NodeStatus {
                    addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: "10.250.0.1".into() }]),
                    conditions: Some(vec![NodeCondition { type_: "Ready".into(), status: "True".into(), ..Default::default() }]),
                    ..Default::default()
                }
            })),
        )
        .await?;

    let pods: Api<Pod> = env.api();
    let pod_name = env.unique_name("web");
    pods.create(
        &PostParams::default(),
        &Pod {
            metadata: ObjectMeta {
                name: Some(pod_name.clone()),
                labels: labels(&[("app", "web")]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node_name.clone()),
                containers: vec![Container {
                    name: "web".into(),
                    image: Some("registry.invalid/web:1".into()),
                    ports: Some(vec![ContainerPort {
                        container_port: 8080,
                        name: Some("http".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await?;
    // What a kubelet would write.
    pods.patch_status(
        &pod_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "status": PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.244.1.7".into()),
                pod_ips: Some(vec![PodIP { ip: "10.244.1.7".into() }]),
                host_ip: Some("10.250.0.1".into()),
                conditions: Some(vec![
                    PodCondition { type_: "Ready".into(), status: "True".into(), ..Default::default() },
                    PodCondition { type_: "ContainersReady".into(), status: "True".into(), ..Default::default() },
                ]),
                ..Default::default()
            }
        })),
    )
    .await?;

    let svc_name = env.unique_name("web");
    let services: Api<Service> = env.api();
    services
        .create(
            &PostParams::default(),
            &Service {
                metadata: ObjectMeta {
                    name: Some(svc_name.clone()),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    selector: labels(&[("app", "web")]),
                    ports: Some(vec![ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: Some(IntOrString::String("http".into())),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await?;
    let svc = services.get(&svc_name).await?;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip}");

    // The slice is named {service}-{random}; watch the list through the service-name label.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), env.namespace());
    let selector = format!("kubernetes.io/service-name={svc_name}");
    let slice = eventually(TIMEOUT, || {
        let slices = slices.clone();
        let selector = selector.clone();
        async move {
            let list = slices
                .list(&ListParams::default().labels(&selector))
                .await?;
            list.items
                .into_iter()
                .find(|s| {
                    s.endpoints.iter().any(|e| {
                        e.addresses == ["10.244.1.7"]
                            && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
                    })
                })
                .context("no EndpointSlice with the ready pod yet")
        }
    })
    .await?;
    let ep = &slice.endpoints[0];
    assert_eq!(ep.node_name.as_deref(), Some(node_name.as_str()));
    assert_eq!(
        ep.target_ref.as_ref().and_then(|r| r.name.as_deref()),
        Some(pod_name.as_str())
    );
    let port = &slice.ports.as_ref().expect("ports")[0];
    assert_eq!(
        (port.name.as_deref(), port.port),
        (Some("http"), Some(8080))
    );
    assert_eq!(
        slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
            .map(String::as_str),
        Some("endpointslice-controller.k8s.io")
    );
    Ok(())
}

/// The garbage collector and namespace controller run: a ConfigMap owned by another is
/// collected with it.
#[tokio::test]
async fn garbage_collector_deletes_dependents() -> Result<()> {
    let env = TestEnv::new().await?;
    let owner = env.unique_name("owner");
    let dependent = env.unique_name("dependent");
    let applied = env
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {owner}\ndata:\n  a: b\n"
        ))
        .await?;
    let uid = applied[0].metadata.uid.clone().expect("uid");
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {dependent}\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: {owner}\n    uid: {uid}\n"
    ))
    .await?;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = env.api();
    cms.delete(&owner, &Default::default()).await?;
    wait_deleted(&cms, &dependent, TIMEOUT).await?;
    Ok(())
}

/// A dedicated plane survives an etcd restart and an apiserver restart with its data, and
/// its outage is real while a component is down.
#[tokio::test]
async fn dedicated_plane_restarts_components_and_keeps_data() -> Result<()> {
    let plane = ControlPlane::dedicated("faults").await?;
    assert_ne!(plane.apiserver_port(), 26443);
    let env = TestEnv::on(plane.clone()).await?;
    let name = env.unique_name("survivor");
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n"
    ))
    .await?;

    plane.restart_etcd().await?;
    plane.restart_apiserver().await?;
    let client = plane.client().await?;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), env.namespace());
    let cm = cms.get(&name).await?;
    assert_eq!(cm.data.unwrap()["k"], "v");

    plane.stop_component(Component::Apiserver).await?;
    let refused = http_get(plane.apiserver_port(), "/readyz").await;
    assert!(refused.is_err(), "apiserver still answering: {refused:?}");
    plane.start().await?;
    assert_eq!(
        cms.get(&name).await?.data.unwrap()["k"],
        "v",
        "data after apiserver outage"
    );

    // The shared plane refuses fault injection.
    let shared = ControlPlane::shared().await?;
    assert!(shared.restart_apiserver().await.is_err());
    Ok(())
}

fn pid_file(plane: &ControlPlane, component: &str) -> std::path::PathBuf {
    plane
        .run_dir()
        .join("pids")
        .join(format!("{component}.pid"))
}

fn read_pid(plane: &ControlPlane, component: &str) -> Result<i32> {
    let path = pid_file(plane, component);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .parse()?)
}

/// Exists and is not a zombie (a SIGKILLed daemon's parent may be slow to reap it).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// What a killed run leaves behind: a component that died (stale pid file) and one that runs
/// without a pid file (a stray). `start` replaces the first and stops the stray before
/// starting a fresh etcd on the same data.
#[tokio::test]
async fn start_recovers_from_dead_and_stray_components_of_a_killed_run() -> Result<()> {
    let plane = ControlPlane::dedicated("stale").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let name = env.unique_name("kept");
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n"
    ))
    .await?;

    let apiserver = read_pid(&plane, "kube-apiserver")?;
    // SAFETY: SIGKILL to the apiserver this plane's pid file names.
    assert_eq!(unsafe { libc::kill(apiserver, libc::SIGKILL) }, 0);
    let stray_etcd = read_pid(&plane, "etcd")?;
    std::fs::remove_file(pid_file(&plane, "etcd"))?;

    plane.start().await?;
    // SIGKILL is asynchronous: wait until the old apiserver is gone.
    eventually(TIMEOUT, || async {
        if alive(apiserver) {
            anyhow::bail!("old apiserver {apiserver} still exists")
        }
        Ok(())
    })
    .await?;
    assert!(
        !alive(stray_etcd),
        "stray etcd {stray_etcd} was not stopped"
    );
    let new_etcd = read_pid(&plane, "etcd")?;
    assert_ne!(new_etcd, stray_etcd);
    assert!(alive(new_etcd));
    assert_ne!(read_pid(&plane, "kube-apiserver")?, apiserver);

    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(plane.client().await?, env.namespace());
    assert_eq!(cms.get(&name).await?.data.unwrap()["k"], "v");
    Ok(())
}

/// Keeps every core busy (one spinning thread per CPU, at normal priority) until dropped.
struct BusyLoops {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl BusyLoops {
    fn start() -> BusyLoops {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                    x
                })
            })
            .collect();
        BusyLoops { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A directory holding a `setsid` that sleeps `delay_s` before it execs the real one: with
/// it first on `PATH`, every component of a plane takes that long from fork to exec, as on a
/// machine thrashing under load.
fn slow_setsid(delay_s: u32) -> Result<std::path::PathBuf> {
    let real = tendril_e2e::Process::which("setsid");
    anyhow::ensure!(real.is_absolute(), "no setsid on PATH");
    let dir = std::env::temp_dir().join(tendril_e2e::unique_name("slow-setsid"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("setsid");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n# fork-to-exec delay of a loaded machine\nsleep {delay_s}\nexec {} \"$@\"\n",
            real.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Planes start on a loaded machine, at their first attempt: two at the same moment while a
/// busy loop runs on every core (under `.ci/run` the `hack/up.sh` cluster runs beside them
/// too), and a third whose components take 8 s from fork to exec. That third one is the
/// failure seen when `tilt ci` ran beside the local cluster: `control-plane.sh` waited at most
/// ~5 s for the exec, then took the process, still a `setsid`, for one that had exited
/// ("kube-apiserver exited while waiting for kube-apiserver /readyz", a log holding only the
/// header line). Components are now known by pid and start time from the fork on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planes_start_at_the_first_attempt_on_a_loaded_machine() -> Result<()> {
    let slow = slow_setsid(8)?;
    let path = format!(
        "{}:{}",
        slow.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let slow_env = [("PATH", path.as_str())];
    let started = std::time::Instant::now();
    let load = BusyLoops::start();
    let (a, b, c) = tokio::join!(
        ControlPlane::dedicated("loaded-a"),
        ControlPlane::dedicated("loaded-b"),
        ControlPlane::dedicated_with_env("slow-exec", &slow_env),
    );
    drop(load);
    let _ = std::fs::remove_dir_all(&slow);
    let planes = [a?, b?, c?];
    println!(
        "three planes up in {:.1}s on a loaded machine",
        started.elapsed().as_secs_f64()
    );
    for plane in &planes {
        assert_eq!(
            plane.start_attempts(),
            1,
            "plane {} needed a second start",
            plane.name()
        );
        let v = plane.client().await?.apiserver_version().await?;
        assert_eq!(v.git_version, "v1.36.3");
        // Each component was spawned once and none was ever taken for gone.
        let checks = std::fs::read_to_string(plane.log_dir().join("pid-checks.log"))?;
        for c in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            assert_eq!(
                checks
                    .lines()
                    .filter(|l| l.starts_with(&format!("{c}: spawned")))
                    .count(),
                1,
                "{}:\n{checks}",
                plane.name()
            );
        }
        assert!(
            !checks.contains("not running"),
            "{}:\n{checks}",
            plane.name()
        );
    }
    // The slow plane's components really were still a `setsid` when they were spawned.
    let slow_checks = std::fs::read_to_string(planes[2].log_dir().join("pid-checks.log"))?;
    assert!(
        slow_checks.contains("comm setsid"),
        "the delay did not apply:\n{slow_checks}"
    );
    Ok(())
}

/// A start that fails (here: kube-apiserver refuses a flag that does not exist) is not
/// retried, and its error says where its logs are kept; they hold the component's own words.
#[tokio::test]
async fn a_failed_start_keeps_its_logs_and_says_where() -> Result<()> {
    let err = ControlPlane::dedicated_with_env(
        "broken",
        &[("TENDRIL_APISERVER_EXTRA_ARGS", "--no-such-flag")],
    )
    .await
    .expect_err("kube-apiserver started with a flag that does not exist");
    let msg = format!("{err:#}");
    println!("{msg}");
    assert!(
        msg.contains("kube-apiserver exited while waiting for kube-apiserver /readyz"),
        "{msg}"
    );
    assert!(msg.contains("exited with status 1"), "{msg}");
    let kept = msg
        .split("logs kept in ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .map(std::path::PathBuf::from)
        .with_context(|| format!("no kept-logs path in: {msg}"))?;
    assert!(
        kept.starts_with(tendril_e2e::test_log_dir()),
        "{} is not in the test's log directory",
        kept.display()
    );
    let log = std::fs::read_to_string(kept.join("kube-apiserver.log"))?;
    assert!(log.contains("unknown flag: --no-such-flag"), "{log}");
    assert!(kept.join("etcd.log").exists());
    assert!(kept.join("pid-checks.log").exists());
    // Not retried: no second attempt's logs.
    let attempts = std::fs::read_dir(tendril_e2e::test_log_dir())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("-attempt"))
        .count();
    assert_eq!(attempts, 0, "a failed start was retried");
    Ok(())
}
