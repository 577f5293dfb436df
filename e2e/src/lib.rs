//! The test world: a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager v1.36.3 built from Go modules by `hack/control-plane-build.sh`),
//! shared by every test of a run, in the spirit of controller-runtime's envtest.
//!
//! # Writing a test
//!
//! ```no_run
//! use std::time::Duration;
//! use k8s_openapi::api::core::v1::ConfigMap;
//! use tendril_e2e::{Process, TestEnv, wait_for};
//!
//! #[tokio::test]
//! async fn example() -> anyhow::Result<()> {
//!     let env = TestEnv::new().await?; // shared plane, CRDs established, fresh namespace
//!     let name = env.unique_name("cm");
//!     env.apply_yaml(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: {{a: b}}"))
//!         .await?;
//!     let cms = env.api::<ConfigMap>();
//!     wait_for(&cms, &name, |o: Option<&ConfigMap>| o.is_some(), Duration::from_secs(30)).await?;
//!
//!     // A workspace binary (cargo's target/debug), killed when `op` drops, also on panic.
//!     let mut op = Process::builder("tendril-operator")
//!         .arg("--kubeconfig").arg(env.kubeconfig())
//!         .env("RUST_LOG", "info")
//!         .spawn()?;
//!     op.wait_for_log("started", Duration::from_secs(60)).await?;
//!     Ok(())
//! } // namespace deleted, operator stopped
//! ```
//!
//! # API
//!
//! - [`TestEnv::new`]`()` on the shared plane, [`TestEnv::on`]`(plane)` on another:
//!   [`client`](TestEnv::client), [`namespace`](TestEnv::namespace),
//!   [`kubeconfig`](TestEnv::kubeconfig), [`plane`](TestEnv::plane),
//!   [`api::<K>`](TestEnv::api) (namespaced, in the test namespace),
//!   [`cluster_api::<K>`](TestEnv::cluster_api), [`unique_name`](TestEnv::unique_name),
//!   [`apply_yaml`](TestEnv::apply_yaml) (test namespace by default),
//!   [`delete_on_drop::<K>(name)`](TestEnv::delete_on_drop) for cluster-scoped objects
//!   (Nodes, NodeNetworks, …), [`wait_for`](TestEnv::wait_for). Dropping the env deletes its
//!   namespace and registered objects (best effort, no waiting).
//! - [`ControlPlane::shared`]`()`: the shared plane in `~/.cache/tendril/test-run` (ports:
//!   apiserver 26443, etcd 22379/22380, controller-manager 30257; `TENDRIL_TEST_RUN` and
//!   `TENDRIL_TEST_PORT_BASE` move it), never the developer's `hack/up.sh` plane. [`ControlPlane::dedicated`]`(name)`: a plane of its own on free
//!   ports (below the kernel's ephemeral range), for fault tests, removed on drop (its logs
//!   kept, see below); [`ControlPlane::dedicated_with_env`] passes environment to
//!   `hack/control-plane.sh` and [`ControlPlane::start_attempts`] tells whether a start had to
//!   be repeated because another plane took a port; only dedicated planes accept
//!   [`restart_apiserver`](ControlPlane::restart_apiserver),
//!   [`restart_etcd`](ControlPlane::restart_etcd), [`restart`](ControlPlane::restart)`(Component)`,
//!   [`stop_component`](ControlPlane::stop_component)`(Component)` and
//!   [`start`](ControlPlane::start). Also [`client`](ControlPlane::client),
//!   [`kubectl`](ControlPlane::kubectl)`(args)` (kubectl 1.36), [`kubeconfig`](ControlPlane::kubeconfig),
//!   [`apiserver_url`](ControlPlane::apiserver_url), [`apiserver_port`](ControlPlane::apiserver_port),
//!   [`etcd_port`](ControlPlane::etcd_port), [`advertise_address`](ControlPlane::advertise_address),
//!   [`log_dir`](ControlPlane::log_dir), [`run_dir`](ControlPlane::run_dir).
//! - [`wait_for`]`(&api, name, cond, timeout)`: waits on a watch (restarted on watch errors,
//!   so it survives an apiserver restart) until `cond(Option<&K>)` holds; returns the object;
//!   the timeout error shows the last state seen. [`wait_deleted`]. [`eventually`]`(timeout,
//!   || async { … })` polls what cannot be watched (HTTP, metrics, kernel state).
//! - [`apply_yaml`]`(&client, yaml, default_ns)` (multi-document, any kind via discovery) and
//!   [`apply`]`(&api, &obj)`: server-side apply, field manager [`FIELD_MANAGER`], forced.
//! - [`Process::builder`]`(program)` `.arg/.args/.env/.name/.current_dir/.spawn()`: a bare
//!   name is a workspace binary in cargo's `target/debug` (build it first: `cargo build
//!   --workspace --bins`, which `hack/test.sh` does), a path is used as is
//!   ([`Process::which`] finds tools on `PATH`). [`pid`](Process::pid),
//!   [`log`](Process::log), [`log_path`](Process::log_path), [`log_tail`](Process::log_tail),
//!   [`wait_for_log`](Process::wait_for_log), [`is_running`](Process::is_running),
//!   [`signal`](Process::signal), [`kill`](Process::kill) (SIGKILL, a crash),
//!   [`stop`](Process::stop)`(grace)` (SIGTERM then SIGKILL). Drop stops it and, when the
//!   test panics, prints its log tail. `TENDRIL_E2E_WRAP_<PROGRAM>` (e.g.
//!   `TENDRIL_E2E_WRAP_TENDRIL_OPERATOR=heaptrack`) runs a program under a profiler.
//! - [`free_port`]`()`: a port for a process a test starts, from 27000-29999 (below the
//!   ephemeral range, where an outgoing connection can take it first), `flock`ed for the
//!   test binary's life.
//! - [`http_get`]`(port, path)` and [`fetch_metrics`]`(port)` → [`Metrics`] with
//!   [`value`](Metrics::value)`(name, &[(label, value)])`, [`sum`](Metrics::sum),
//!   [`has`](Metrics::has), [`matching`](Metrics::matching) (OpenMetrics counters are
//!   named `…_total`).
//! - [`unique_name`]`(prefix)`: `{prefix}-{pid}-{n}-{rand4}`, a valid DNS label.
//! - Logs that explain a failure: [`test_log_dir`]`()` is the running test's directory,
//!   `~/.cache/tendril/test-logs/{binary}.{test}/` (`$TENDRIL_TEST_LOGS` moves the root,
//!   [`test_logs_root`]): the logs of its [`Process`]es and, copied before the plane is
//!   deleted, the component logs of its dedicated planes (`plane-{name}/`). A rerun of the
//!   test moves it to `….prev` first; `hack/test.sh` removes the directories of tests that passed and prints
//!   those of tests that failed. The shared plane's logs stay in its run dir
//!   (`~/.cache/tendril/test-run/logs`).
//!
//! - Worlds beyond Tendril's own: [`services`] runs one services conformance matrix against
//!   a real `kube-proxy` per simulated node (no Tendril; `kp-…` namespaces) and against the
//!   simulated Tendril cluster; `tendril-svc-probe` is its client process.
//!
//! # Facts about this control plane
//!
//! - Nothing schedules pods and there is no kubelet: set `spec.nodeName`, create the Node,
//!   and write Pod status through the status subresource. The EndpointSlice controller
//!   ignores pods on Nodes that do not exist. Running controllers: endpointslice,
//!   endpointslice-mirroring, endpoints, namespace, garbage-collector, serviceaccount,
//!   serviceaccount-token, root-ca-certificate-publisher, replicaset, deployment,
//!   clusterrole-aggregation, pod-garbage-collector, service-cidr. No node-lifecycle
//!   controller, so Nodes are never tainted or evicted.
//! - Service CIDRs 10.96.0.0/16 and fd00:10:96::/112 (dual stack, IPv4 first: a Service
//!   is IPv4 unless it asks for IPv6); the apiserver advertises the machine's primary IPv4
//!   address (see `hack/control-plane.sh`), but binds 127.0.0.1 only.
//! - Cleanup after a killed run: control-plane processes are tracked by pid files in the
//!   plane's run dir; [`Process`] children die with their test binary (`PDEATHSIG`) and are
//!   also swept by pid file; e2e namespaces and dedicated planes of dead test binaries are
//!   deleted when the next test binary starts.

pub mod bgp;
pub mod encryption;
mod env;
mod http;
pub mod ipv6;
mod kube_util;
pub mod netpol;
mod plane;
mod ports;
mod process;
pub mod services;
pub mod sim;
pub mod suite;
pub mod traffic;
mod util;

pub use env::TestEnv;
pub use http::{Metrics, Sample, fetch_metrics, http_get};
pub use kube_util::{FIELD_MANAGER, apply, apply_yaml, eventually, wait_deleted, wait_for};
pub use plane::{Component, ControlPlane, E2E_LABEL, OWNER_LABEL, apply_crds};
pub use ports::free_port;
pub use process::{Process, ProcessBuilder, sweep_stale_processes};
pub use util::{
    cache_dir, k8s_bin_dir, repo_root, target_bin_dir, test_log_dir, test_logs_root, unique_name,
};
