//! [`ControlPlane`]: etcd + kube-apiserver + kube-controller-manager run by
//! `hack/control-plane.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::conditions;
use kube::{Client, Config};
use rand::Rng;

use crate::kube_util::{FIELD_MANAGER, wait_for};
use crate::util::{cache_dir, k8s_bin_dir, owner_alive, owner_tag, repo_root};

/// Label on every namespace a [`crate::TestEnv`] creates.
pub const E2E_LABEL: &str = "tendril.dev/e2e";
/// Label naming the test binary (`pid.starttime`) that owns an e2e namespace; namespaces of
/// dead owners are deleted when the next test binary starts.
pub const OWNER_LABEL: &str = "tendril.dev/e2e-owner";

/// Fixed ports of the shared test plane (the developer's `hack/up.sh` plane uses
/// 12379/16443/20257, so both run side by side).
const SHARED_PORTS: Ports = Ports {
    etcd: 22379,
    etcd_peer: 22380,
    apiserver: 26443,
    kcm: 30257,
};

/// A control-plane component, for fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Etcd,
    Apiserver,
    ControllerManager,
}

impl Component {
    fn arg(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::Apiserver => "apiserver",
            Component::ControllerManager => "controller-manager",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    etcd: u16,
    etcd_peer: u16,
    apiserver: u16,
    kcm: u16,
}

/// A running control plane. [`ControlPlane::shared`] is the one every test of a run shares;
/// [`ControlPlane::dedicated`] gives a fault test its own plane, stopped and deleted on drop.
#[derive(Debug)]
pub struct ControlPlane {
    name: String,
    run_dir: PathBuf,
    settings: HashMap<String, String>,
    dedicated: bool,
    /// Dedicated planes: where the component logs are copied before the run dir goes (in the
    /// test's log directory, [`crate::test_log_dir`]).
    keep_logs: Option<PathBuf>,
    /// Extra environment of every `control-plane.sh` command on this plane.
    script_env: Vec<(String, String)>,
    /// Starts it took (1 unless a port was taken by another process in between).
    start_attempts: u32,
    /// Dedicated planes: the reservation of their ports, released on drop.
    _ports: Option<PortBlock>,
}

static SHARED: OnceLock<std::result::Result<Arc<ControlPlane>, String>> = OnceLock::new();

impl ControlPlane {
    /// The shared test plane in `~/.cache/tendril/test-run` (never the developer's
    /// `~/.cache/tendril/run`; `TENDRIL_TEST_RUN` and `TENDRIL_TEST_PORT_BASE` (etcd, etcd
    /// peer, apiserver, controller-manager on BASE..BASE+3) override both), with the CRDs of `crds/manifests/` applied and established.
    /// Started on first use by any test binary (a file lock in `control-plane.sh`
    /// serializes parallel binaries; a healthy plane is reused, stale processes of a killed
    /// run are stopped and restarted). Never stopped by the tests: the next run reuses it
    /// (`TENDRIL_RUN=~/.cache/tendril/test-run hack/control-plane.sh stop` stops it).
    /// Also deletes e2e namespaces and dedicated planes left behind by dead test binaries.
    pub async fn shared() -> Result<Arc<ControlPlane>> {
        let res = blocking(|| {
            SHARED
                .get_or_init(|| init_shared().map(Arc::new).map_err(|e| format!("{e:#}")))
                .clone()
        });
        res.map_err(|e| anyhow!("shared control plane failed to start: {e}"))
    }

    /// A control plane of its own for a test that breaks things (restarts etcd or the
    /// apiserver): own run dir `~/.cache/tendril/test-planes/{name}-{pid}.{start}`, own free
    /// ports (below the ephemeral port range, see `plane_ports`), CRDs
    /// applied. Stopped and deleted when the last `Arc` drops,
    /// after its component logs are copied to `plane-{name}/` in the test's log directory
    /// ([`crate::test_log_dir`]); a killed test binary's planes are cleaned up by the next
    /// [`ControlPlane::shared`] or `dedicated`.
    pub async fn dedicated(name: &str) -> Result<Arc<ControlPlane>> {
        ControlPlane::dedicated_with_env(name, &[]).await
    }

    /// [`ControlPlane::dedicated`] with more environment for every `hack/control-plane.sh`
    /// command on the plane, e.g. `TENDRIL_APISERVER_EXTRA_ARGS` or a `PATH`.
    ///
    /// A start that fails because one of its ports was taken in between (by a process other
    /// than a dedicated plane: those reserve theirs) is tried again on new ports, at most
    /// three times ([`ControlPlane::start_attempts`]); any other failure is the error, with
    /// the directory its logs are kept in.
    pub async fn dedicated_with_env(name: &str, env: &[(&str, &str)]) -> Result<Arc<ControlPlane>> {
        sweep_dedicated_planes();
        let name = crate::unique_name(name);
        let run_dir = cache_dir()
            .join("test-planes")
            .join(format!("{name}.{}", owner_tag()));
        let test_logs = crate::test_log_dir();
        let script_env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut last_err = None;
        for attempt in 1..=3 {
            let block = plane_ports()?;
            let ports = block.ports;
            let keep = test_logs.join(if attempt == 1 {
                format!("plane-{name}")
            } else {
                format!("plane-{name}-attempt{attempt}")
            });
            let plane = ControlPlane {
                name: name.clone(),
                run_dir: run_dir.clone(),
                settings: HashMap::new(),
                dedicated: true,
                keep_logs: Some(keep.clone()),
                script_env: script_env.clone(),
                start_attempts: attempt,
                _ports: Some(block),
            };
            let (rd, se) = (run_dir.clone(), script_env.clone());
            match tokio::task::spawn_blocking(move || run_script(&rd, Some(ports), &se, &["start"]))
                .await?
            {
                Ok(()) => {
                    let mut plane = plane;
                    plane.settings = read_settings(&run_dir)?;
                    let client = plane.client().await?;
                    apply_crds(&client).await?;
                    return Ok(Arc::new(plane));
                }
                Err(e) => {
                    // Dropping `plane` keeps its logs and stops whatever did start.
                    drop(plane);
                    let port_taken = format!("{e:#}").contains(" is in use (set TENDRIL_")
                        || format!("{e:#}").contains("bind: address already in use");
                    eprintln!(
                        "dedicated plane {name} did not start (attempt {attempt}); its logs are kept in {}:\n{e:#}",
                        keep.display()
                    );
                    let e = e.context(format!(
                        "dedicated plane {name} did not start; logs kept in {}",
                        keep.display()
                    ));
                    if !port_taken {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("dedicated plane did not start")))
    }

    /// How many starts a dedicated plane took (see [`ControlPlane::dedicated_with_env`]).
    pub fn start_attempts(&self) -> u32 {
        self.start_attempts
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plane's state dir (`TENDRIL_RUN`): pki/, logs/, pids/, etcd/, kubeconfig.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Admin kubeconfig (client certificate in group system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        PathBuf::from(self.setting("KUBECONFIG"))
    }

    /// `https://127.0.0.1:PORT`
    pub fn apiserver_url(&self) -> String {
        self.setting("APISERVER_URL")
    }

    pub fn apiserver_port(&self) -> u16 {
        self.setting("APISERVER_PORT").parse().unwrap_or(0)
    }

    pub fn etcd_port(&self) -> u16 {
        self.setting("ETCD_PORT").parse().unwrap_or(0)
    }

    /// The non-loopback address the apiserver advertises (the `kubernetes` Service's endpoint).
    pub fn advertise_address(&self) -> String {
        self.setting("ADVERTISE_ADDRESS")
    }

    /// Directory of the component logs (`etcd.log`, `kube-apiserver.log`, …).
    pub fn log_dir(&self) -> PathBuf {
        self.run_dir.join("logs")
    }

    fn setting(&self, key: &str) -> String {
        self.settings.get(key).cloned().unwrap_or_default()
    }

    /// A new admin client. Clients are bound to the tokio runtime that creates them, so each
    /// test makes its own.
    pub async fn client(&self) -> Result<Client> {
        let kc = Kubeconfig::read_from(self.kubeconfig())?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Runs kubectl 1.36 (built with the plane) with this plane's kubeconfig; returns stdout,
    /// or an error carrying stderr.
    pub async fn kubectl<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = tokio::process::Command::new(k8s_bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(&args)
            .output()
            .await
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {:?} failed ({}): {}",
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Restarts kube-apiserver and waits until the plane is ready again. Only on a
    /// [`ControlPlane::dedicated`] plane (the shared one serves other tests).
    pub async fn restart_apiserver(&self) -> Result<()> {
        self.restart(Component::Apiserver).await
    }

    /// Restarts etcd (data kept) and waits until the plane is ready again. Dedicated planes only.
    pub async fn restart_etcd(&self) -> Result<()> {
        self.restart(Component::Etcd).await
    }

    /// Restarts one component and waits until the whole plane is ready. Dedicated planes only.
    pub async fn restart(&self, c: Component) -> Result<()> {
        self.fault_op(&["restart", c.arg()]).await
    }

    /// Stops one component and leaves it down (an outage); [`ControlPlane::start`] brings it
    /// back. Dedicated planes only.
    pub async fn stop_component(&self, c: Component) -> Result<()> {
        self.fault_op(&["kill", c.arg()]).await
    }

    /// Starts whatever component is not running and waits until the plane is ready.
    pub async fn start(&self) -> Result<()> {
        self.fault_op(&["start"]).await
    }

    async fn fault_op(&self, args: &[&str]) -> Result<()> {
        if !self.dedicated {
            bail!(
                "fault injection on the shared plane would break other tests; use ControlPlane::dedicated"
            );
        }
        let rd = self.run_dir.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env = self.script_env.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_script(&rd, None, &env, &args)
        })
        .await?
    }
}

impl Drop for ControlPlane {
    /// A dedicated plane: its logs are copied to the test's log directory, then it is stopped
    /// and its run dir deleted.
    fn drop(&mut self) {
        if !self.dedicated {
            return;
        }
        if let Some(keep) = &self.keep_logs {
            match crate::util::copy_files(&self.log_dir(), keep) {
                Ok(_) if std::thread::panicking() => eprintln!(
                    "---- dedicated plane {}: component logs kept in {} ----",
                    self.name,
                    keep.display()
                ),
                Ok(_) => {}
                Err(e) => eprintln!(
                    "keeping the logs of dedicated plane {} in {}: {e}",
                    self.name,
                    keep.display()
                ),
            }
        }
        if let Err(e) = run_script(&self.run_dir, None, &self.script_env, &["clean"]) {
            eprintln!("stopping dedicated plane {}: {e:#}", self.name);
        }
    }
}

/// Runs `f`, which blocks for seconds, from any runtime flavour: inline on a current-thread
/// runtime (each `#[tokio::test]` has its own), via `block_in_place` on a multi-thread one.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn run_script(
    run_dir: &Path,
    ports: Option<Ports>,
    env: &[(String, String)],
    args: &[&str],
) -> Result<()> {
    let script = repo_root().join("hack/control-plane.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(args).env("TENDRIL_RUN", run_dir);
    // Settings come from the plane's own plane.env or from `ports`, never from a
    // developer's environment meant for the local cluster.
    for var in [
        "TENDRIL_ETCD_PORT",
        "TENDRIL_ETCD_PEER_PORT",
        "TENDRIL_APISERVER_PORT",
        "TENDRIL_KCM_PORT",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(p) = ports {
        cmd.env("TENDRIL_ETCD_PORT", p.etcd.to_string())
            .env("TENDRIL_ETCD_PEER_PORT", p.etcd_peer.to_string())
            .env("TENDRIL_APISERVER_PORT", p.apiserver.to_string())
            .env("TENDRIL_KCM_PORT", p.kcm.to_string());
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "control-plane.sh {} (TENDRIL_RUN={}) failed ({}):\n{}",
            args.join(" "),
            run_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn read_settings(run_dir: &Path) -> Result<HashMap<String, String>> {
    let path = run_dir.join("plane.env");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The ports of a dedicated plane, and the lock that reserves them while the plane lives.
#[derive(Debug)]
struct PortBlock {
    ports: Ports,
    /// `flock`ed `~/.cache/tendril/test-ports/FIRST.lock`; the kernel releases it when the
    /// file is closed, also when the test binary is killed. `None`: ports from the kernel.
    _lock: Option<std::fs::File>,
}

/// Four free ports for a dedicated plane, a block of four just below the kernel's ephemeral
/// port range (`net.ipv4.ip_local_port_range`, 32768-60999 by default: blocks in
/// 32000-32767), reserved for the plane's life by a lock file.
///
/// Never inside that range: a port there can be taken at any moment as the local port of some
/// outgoing connection (every `curl`, `kubectl` and client of the other planes opens some),
/// and a connection's local port (established or in TIME_WAIT) makes a listener's bind fail
/// with "address already in use", SO_REUSEADDR or not, although nothing listens there. A
/// plane binds its ports seconds after they are picked (etcd first, the controller-manager
/// once the apiserver is ready), and its restarts bind them again: ports found by binding
/// port 0, as before, came from that range and lost that race now and then on a busy machine.
/// Below it only listeners compete: the other planes' fixed ports are lower (see
/// `hack/control-plane.sh`, `hack/tilt/ci.sh`), dedicated planes of every test binary on the
/// machine take distinct blocks (the lock, which also covers the seconds before a port is
/// bound), and a block one of whose ports something else listens on is skipped.
fn plane_ports() -> Result<PortBlock> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const BLOCKS: u16 = 192;
    if low <= 10_000 + 4 * BLOCKS {
        // An unusual range (nearly every port ephemeral): the kernel's choice, as before.
        let listeners: Vec<std::net::TcpListener> = (0..4)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let p: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()?;
        return Ok(PortBlock {
            ports: Ports {
                etcd: p[0],
                etcd_peer: p[1],
                apiserver: p[2],
                kcm: p[3],
            },
            _lock: None,
        });
    }
    let base = low - 4 * BLOCKS;
    let dir = cache_dir().join("test-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let first_block = rand::rng().random_range(0..BLOCKS);
    for i in 0..BLOCKS {
        let first = base + 4 * ((first_block + i) % BLOCKS);
        let Some(file) = crate::ports::try_lock(&dir.join(format!("{first}.lock")))? else {
            continue; // another plane's
        };
        let ports: Vec<u16> = (first..first + 4).collect();
        if ports
            .iter()
            .all(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return Ok(PortBlock {
                ports: Ports {
                    etcd: ports[0],
                    etcd_peer: ports[1],
                    apiserver: ports[2],
                    kcm: ports[3],
                },
                _lock: Some(file),
            });
        }
    }
    bail!(
        "no free block of four ports in {base}-{} (locks in {})",
        low - 1,
        dir.display()
    )
}

fn init_shared() -> Result<ControlPlane> {
    crate::process::sweep_stale_processes();
    sweep_dedicated_planes();
    if !k8s_bin_dir().join("kube-apiserver").exists() {
        bail!(
            "control-plane binaries missing in {}: run hack/control-plane.sh build",
            k8s_bin_dir().display()
        );
    }
    // Overrides, for running a second suite (another checkout) beside this one.
    let run_dir = std::env::var_os("TENDRIL_TEST_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("test-run"));
    let ports = match std::env::var("TENDRIL_TEST_PORT_BASE") {
        Ok(base) => {
            let b: u16 = base
                .parse()
                .context("TENDRIL_TEST_PORT_BASE is not a port")?;
            Ports {
                etcd: b,
                etcd_peer: b + 1,
                apiserver: b + 2,
                kcm: b + 3,
            }
        }
        Err(_) => SHARED_PORTS,
    };
    // The shared plane's run dir is never deleted by the tests: its logs stay there.
    run_script(&run_dir, Some(ports), &[], &["start"])
        .with_context(|| format!("its logs: {}", run_dir.join("logs").display()))?;
    let plane = ControlPlane {
        name: "shared".into(),
        settings: read_settings(&run_dir)?,
        run_dir,
        dedicated: false,
        keep_logs: None,
        script_env: Vec::new(),
        start_attempts: 1,
        _ports: None,
    };
    // Client work needs a runtime of its own: the caller's may be a current-thread runtime
    // that this call is blocking.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = plane.client().await?;
                apply_crds(&client).await?;
                delete_stale_namespaces(&client).await
            })
        })
        .join()
        .map_err(|_| anyhow!("CRD setup thread panicked"))?
    })?;
    Ok(plane)
}

/// Server-side applies every CRD manifest in `crds/manifests/` and waits until each is
/// Established.
pub async fn apply_crds(client: &Client) -> Result<()> {
    let dir = repo_root().join("crds/manifests");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path)?;
        let docs: Vec<CustomResourceDefinition> = serde_saphyr::from_multiple(&text)
            .with_context(|| format!("parsing {}", path.display()))?;
        for crd in docs {
            let name = crd
                .metadata
                .name
                .clone()
                .ok_or_else(|| anyhow!("CRD without name in {}", path.display()))?;
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await
            .with_context(|| format!("applying CRD {name} from {}", path.display()))?;
            names.push(name);
        }
    }
    for name in names {
        wait_for(
            &api,
            &name,
            conditions::is_crd_established(),
            Duration::from_secs(60),
        )
        .await?;
    }
    Ok(())
}

/// Deletes e2e namespaces whose owning test binary is gone (a killed run).
async fn delete_stale_namespaces(client: &Client) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let list = api.list(&ListParams::default().labels(E2E_LABEL)).await?;
    for ns in list {
        let owner = ns
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(OWNER_LABEL))
            .cloned()
            .unwrap_or_default();
        let terminating = ns.metadata.deletion_timestamp.is_some();
        if !terminating && !owner_alive(&owner) {
            let name = ns.metadata.name.unwrap_or_default();
            let _ = api.delete(&name, &DeleteParams::background()).await;
        }
    }
    Ok(())
}

/// Stops and deletes dedicated planes of dead test binaries. Once per binary.
fn sweep_dedicated_planes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(cache_dir().join("test-planes")) else {
            return;
        };
        for e in entries.flatten() {
            let dir_name = e.file_name().to_string_lossy().into_owned();
            // {name}.{pid}.{start}: the owner tag is the last two dot-separated fields.
            let mut parts = dir_name.rsplitn(3, '.');
            let (Some(start), Some(pid)) = (parts.next(), parts.next()) else {
                continue;
            };
            if !owner_alive(&format!("{pid}.{start}")) {
                let _ = run_script(&e.path(), None, &[], &["clean"]);
            }
        }
    });
}
