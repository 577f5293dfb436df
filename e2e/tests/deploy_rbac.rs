//! The RBAC of `deploy/kustomize/base` is real and least-privilege: on a control plane of
//! its own (so no other test's operator or objects interfere), the rendered Namespace,
//! ServiceAccounts, (Cluster)Roles and bindings are installed as they are, tokens are minted
//! for the ServiceAccounts with the TokenRequest API, and
//! - each ServiceAccount is asked, through SelfSubjectAccessReviews made with its own token,
//!   what it may and may not do (the agent reads Secrets only in `tendril-bgp-secrets`,
//!   the BGP peers' passwords, and `tendril-ipsec-keys`, and writes no desired state;
//!   only the operator writes desired state);
//! - the agent's API calls (watch its NodeNetwork by field selector, list/watch Endpoints,
//!   server-side apply of NodeNetwork status) succeed with its token, and a write it must
//!   not make is refused with 403;
//! - the real `tendril-operator` runs with a kubeconfig holding only its token: it takes the
//!   Lease, reconciles a Node into a NodeNetwork and gives it a pod CIDR from a PodIPPool,
//!   and logs no authorization failure;
//! - the real `tendril-agent` runs with only its token and only the DaemonSet's
//!   capabilities, configures a node network namespace and reports Ready.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus, Pod, Secret, ServiceAccount};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use tendril_crds::v1alpha1::{Endpoint, NodeNetwork, PodIPPool};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, apply_yaml, eventually, k8s_bin_dir, repo_root, target_bin_dir,
    unique_name, wait_for,
};

const NAMESPACE: &str = "tendril-system";
/// The namespace of the BGP peers' password Secrets (deploy/kustomize/base/bgp-secrets.yaml).
const BGP_SECRETS_NAMESPACE: &str = "tendril-bgp-secrets";
/// The namespace of the IPsec key Secrets (deploy/kustomize/base/ipsec-keys.yaml).
const IPSEC_KEYS_NAMESPACE: &str = "tendril-ipsec-keys";
const TIMEOUT: Duration = Duration::from_secs(90);

/// One access question: verb, group, resource (with `/subresource`), namespace, name.
#[derive(Clone, Copy, Debug)]
struct Access {
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: Option<&'static str>,
    name: Option<&'static str>,
}

const fn cluster(verb: &'static str, group: &'static str, resource: &'static str) -> Access {
    Access {
        verb,
        group,
        resource,
        namespace: None,
        name: None,
    }
}

const fn ns(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: &'static str,
) -> Access {
    Access {
        verb,
        group,
        resource,
        namespace: Some(namespace),
        name: None,
    }
}

const fn named(mut a: Access, name: &'static str) -> Access {
    a.name = Some(name);
    a
}

/// The desired-state kinds (written only by the operator's reconcilers).
const DESIRED_STATE: &[&str] = &[
    "nodenetworks",
    "endpoints",
    "identities",
    "resolvedpolicies",
    "lbservices",
    "bgpnodeconfigs",
    "egressroutes",
];

/// Renders the base with the plane's kubectl and keeps the documents the test installs.
async fn rendered_rbac() -> Result<String> {
    let out = tokio::process::Command::new(k8s_bin_dir().join("kubectl"))
        .arg("kustomize")
        .arg(repo_root().join("deploy/kustomize/base"))
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(std::str::from_utf8(&out.stdout)?)?;
    let keep = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    let kept: Vec<String> = docs
        .iter()
        .filter(|d| keep.iter().any(|k| d["kind"] == *k))
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    ensure!(
        kept.len() >= 9,
        "expected namespace, 2 service accounts and their roles, got {}",
        kept.len()
    );
    // JSON documents are YAML documents.
    Ok(kept.join("\n---\n"))
}

/// A kubeconfig for `sa` in tendril-system: the plane's server and CA, a fresh token of the
/// ServiceAccount (TokenRequest API), nothing else.
async fn service_account_kubeconfig(
    plane: &ControlPlane,
    admin: &Client,
    sa: &str,
    bound_pod: Option<&Pod>,
    dir: &Path,
) -> Result<PathBuf> {
    let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
    // Bound to a Pod, as the kubelet's projected tokens are: the token then names the Pod's
    // node (user extra authentication.kubernetes.io/node-name).
    let bound_object_ref = bound_pod.map(|p| BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: p.metadata.name.clone(),
        uid: p.metadata.uid.clone(),
    });
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            bound_object_ref,
            ..Default::default()
        },
        ..Default::default()
    };
    let token = api
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {sa}"))?
        .status
        .ok_or_else(|| anyhow!("TokenRequest for {sa} returned no status"))?
        .token;
    let admin_kc: Value = serde_saphyr::from_str(&std::fs::read_to_string(plane.kubeconfig())?)?;
    let mut cluster = admin_kc["clusters"][0]["cluster"].clone();
    cluster["server"] = json!(plane.apiserver_url());
    let kc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "plane", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "plane", "user": sa}}],
        "current-context": sa,
    });
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, serde_json::to_string_pretty(&kc)?)?;
    Ok(path)
}

async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// Asks the apiserver, as the client's own identity, whether it may do `a`.
async fn may(client: &Client, a: Access) -> Result<bool> {
    let (resource, subresource) = match a.resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (a.resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(a.verb.into()),
                group: Some(a.group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: a.namespace.map(str::to_string),
                name: a.name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Checks every question; collects all wrong answers before failing.
async fn expect(who: &str, client: &Client, allowed: &[Access], denied: &[Access]) -> Result<()> {
    let mut wrong = Vec::new();
    for a in allowed {
        if !may(client, *a).await? {
            wrong.push(format!("{who} should be allowed {a:?}"));
        }
    }
    for a in denied {
        if may(client, *a).await? {
            wrong.push(format!("{who} must not be allowed {a:?}"));
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

fn forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// A scratch directory for kubeconfigs, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent Pod of the DaemonSet's ServiceAccount, bound to `node` (nothing schedules or
/// runs it here: it exists so a token can be bound to it).
async fn agent_pod_on(admin: &Client, node: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("tendril-agent-{node}")},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "tendril-agent",
            "hostNetwork": true,
            "containers": [{"name": "agent", "image": "localhost/tendril/agent:dev"}],
        },
    }))?;
    Ok(pods.create(&PostParams::default(), &pod).await?)
}

#[tokio::test]
async fn service_accounts_get_exactly_the_access_the_code_needs() -> Result<()> {
    let plane = ControlPlane::dedicated("rbac").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let admin = env.client();
    apply_yaml(&admin, &rendered_rbac().await?, None).await?;
    let scratch = Scratch(std::env::temp_dir().join(unique_name("rbac")));
    std::fs::create_dir_all(&scratch.0)?;
    // The agent's token is bound to an agent Pod on the test's node, like the DaemonSet's.
    let node_name = unique_name("rbac-node");
    let agent_pod = agent_pod_on(&admin, &node_name).await?;
    let agent_kc = service_account_kubeconfig(
        &plane,
        &admin,
        "tendril-agent",
        Some(&agent_pod),
        &scratch.0,
    )
    .await?;
    let operator_kc =
        service_account_kubeconfig(&plane, &admin, "tendril-operator", None, &scratch.0).await?;
    let agent = client_from(&agent_kc).await?;
    let operator = client_from(&operator_kc).await?;
    // A ServiceAccount Tendril knows nothing of: what "everybody else" may do.
    let other = {
        let sa: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
        sa.create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("bystander".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
        client_from(
            &service_account_kubeconfig(&plane, &admin, "bystander", None, &scratch.0).await?,
        )
        .await?
    };

    // The agent reads desired state and writes only NodeNetwork status.
    let mut agent_denied = vec![
        cluster("list", "", "secrets"),
        cluster("watch", "", "secrets"),
        ns("get", "", "secrets", NAMESPACE),
        ns("list", "", "secrets", "kube-system"),
        ns("create", "", "secrets", BGP_SECRETS_NAMESPACE),
        ns("patch", "", "secrets", BGP_SECRETS_NAMESPACE),
        ns("delete", "", "secrets", BGP_SECRETS_NAMESPACE),
        ns("list", "", "secrets", IPSEC_KEYS_NAMESPACE),
        ns("create", "", "secrets", IPSEC_KEYS_NAMESPACE),
        cluster("patch", "", "nodes"),
        cluster("delete", "", "pods"),
        ns("create", "coordination.k8s.io", "leases", NAMESPACE),
        cluster("escalate", "rbac.authorization.k8s.io", "clusterroles"),
    ];
    for kind in DESIRED_STATE {
        for verb in ["create", "patch", "update", "delete", "deletecollection"] {
            agent_denied.push(cluster(verb, "tendril.dev", kind));
        }
    }
    expect(
        "tendril-agent",
        &agent,
        &[
            cluster("get", "tendril.dev", "nodenetworks"),
            cluster("list", "tendril.dev", "nodenetworks"),
            cluster("watch", "tendril.dev", "nodenetworks"),
            cluster("patch", "tendril.dev", "nodenetworks/status"),
            cluster("list", "tendril.dev", "endpoints"),
            cluster("watch", "tendril.dev", "endpoints"),
            cluster("patch", "tendril.dev", "endpoints/status"),
            cluster("list", "tendril.dev", "identities"),
            cluster("watch", "tendril.dev", "identities"),
            cluster("list", "tendril.dev", "lbservices"),
            cluster("watch", "tendril.dev", "lbservices"),
            cluster("list", "tendril.dev", "egressroutes"),
            cluster("watch", "tendril.dev", "egressroutes"),
            cluster("get", "tendril.dev", "bgpnodeconfigs"),
            cluster("watch", "tendril.dev", "bgpnodeconfigs"),
            cluster("patch", "tendril.dev", "bgpnodeconfigs/status"),
            ns("get", "", "secrets", BGP_SECRETS_NAMESPACE),
            ns("list", "", "secrets", BGP_SECRETS_NAMESPACE),
            ns("watch", "", "secrets", BGP_SECRETS_NAMESPACE),
            ns("get", "", "secrets", IPSEC_KEYS_NAMESPACE),
        ],
        &agent_denied,
    )
    .await?;

    // The operator writes desired state, reads the cluster's objects it derives it from,
    // holds its Lease and nothing beyond.
    expect(
        "tendril-operator",
        &operator,
        &[
            cluster("list", "", "nodes"),
            cluster("watch", "", "nodes"),
            cluster("update", "", "nodes/finalizers"),
            cluster("get", "", "pods"),
            cluster("list", "", "pods"),
            cluster("watch", "", "pods"),
            ns("list", "", "secrets", IPSEC_KEYS_NAMESPACE),
            ns("create", "", "secrets", IPSEC_KEYS_NAMESPACE),
            ns("delete", "", "secrets", IPSEC_KEYS_NAMESPACE),
            cluster("watch", "", "namespaces"),
            ns("create", "events.k8s.io", "events", "default"),
            cluster("create", "tendril.dev", "nodenetworks"),
            cluster("patch", "tendril.dev", "nodenetworks"),
            cluster("watch", "tendril.dev", "nodenetworks"),
            cluster("patch", "tendril.dev", "nodenetworks/status"),
            ns("create", "tendril.dev", "endpoints", "default"),
            ns("patch", "tendril.dev", "endpoints", "default"),
            ns("delete", "tendril.dev", "endpoints", "default"),
            cluster("create", "tendril.dev", "identities"),
            cluster("delete", "tendril.dev", "identities"),
            cluster("patch", "tendril.dev", "identities/status"),
            cluster("watch", "tendril.dev", "podippools"),
            cluster("patch", "tendril.dev", "podippools/status"),
            cluster("list", "", "services"),
            cluster("watch", "", "services"),
            cluster("update", "", "services/finalizers"),
            cluster("list", "discovery.k8s.io", "endpointslices"),
            cluster("watch", "discovery.k8s.io", "endpointslices"),
            cluster("list", "tendril.dev", "lbservices"),
            cluster("watch", "tendril.dev", "lbservices"),
            ns("create", "tendril.dev", "lbservices", "default"),
            ns("patch", "tendril.dev", "lbservices", "default"),
            ns("delete", "tendril.dev", "lbservices", "default"),
            ns("patch", "tendril.dev", "lbservices/status", "default"),
            cluster("list", "tendril.dev", "bgppeeringpolicies"),
            cluster("watch", "tendril.dev", "bgppeeringpolicies"),
            cluster("patch", "tendril.dev", "bgppeeringpolicies/status"),
            cluster("list", "tendril.dev", "bgpnodeconfigs"),
            cluster("watch", "tendril.dev", "bgpnodeconfigs"),
            cluster("create", "tendril.dev", "bgpnodeconfigs"),
            cluster("patch", "tendril.dev", "bgpnodeconfigs"),
            cluster("delete", "tendril.dev", "bgpnodeconfigs"),
            cluster("patch", "", "services/status"),
            cluster("watch", "tendril.dev", "loadbalancerippools"),
            cluster("patch", "tendril.dev", "loadbalancerippools/status"),
            cluster("list", "tendril.dev", "egressgatewaypolicies"),
            cluster("watch", "tendril.dev", "egressgatewaypolicies"),
            cluster("patch", "tendril.dev", "egressgatewaypolicies/status"),
            cluster("update", "tendril.dev", "egressgatewaypolicies/finalizers"),
            cluster("list", "tendril.dev", "egressroutes"),
            cluster("watch", "tendril.dev", "egressroutes"),
            cluster("create", "tendril.dev", "egressroutes"),
            cluster("patch", "tendril.dev", "egressroutes"),
            cluster("delete", "tendril.dev", "egressroutes"),
            ns("create", "coordination.k8s.io", "leases", NAMESPACE),
            named(
                ns("get", "coordination.k8s.io", "leases", NAMESPACE),
                "tendril-operator",
            ),
            named(
                ns("patch", "coordination.k8s.io", "leases", NAMESPACE),
                "tendril-operator",
            ),
        ],
        &[
            cluster("list", "", "secrets"),
            ns("get", "", "secrets", NAMESPACE),
            ns("get", "", "secrets", IPSEC_KEYS_NAMESPACE),
            ns("patch", "", "secrets", IPSEC_KEYS_NAMESPACE),
            cluster("update", "", "pods/finalizers"),
            cluster("patch", "", "nodes"),
            cluster("delete", "", "nodes"),
            cluster("delete", "", "pods"),
            cluster("patch", "", "services"),
            cluster("create", "discovery.k8s.io", "endpointslices"),
            cluster("patch", "tendril.dev", "bgppeeringpolicies"),
            cluster("patch", "tendril.dev", "egressgatewaypolicies"),
            named(
                ns("patch", "coordination.k8s.io", "leases", NAMESPACE),
                "somebody-elses-lease",
            ),
            named(
                ns("patch", "coordination.k8s.io", "leases", "kube-system"),
                "tendril-operator",
            ),
            cluster("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
            cluster(
                "delete",
                "apiextensions.k8s.io",
                "customresourcedefinitions",
            ),
        ],
    )
    .await?;

    // Nobody else writes desired state or reads it.
    let mut bystander_denied = vec![cluster("list", "", "secrets")];
    for kind in DESIRED_STATE {
        for verb in ["create", "patch", "update", "delete", "list"] {
            bystander_denied.push(cluster(verb, "tendril.dev", kind));
        }
    }
    bystander_denied.push(cluster("patch", "tendril.dev", "nodenetworks/status"));
    expect("bystander", &other, &[], &bystander_denied).await?;

    // Real calls with the tokens, not only reviews.
    let secrets: Api<Secret> = Api::all(agent.clone());
    let err = secrets
        .list(&ListParams::default())
        .await
        .expect_err("agent listed Secrets");
    ensure!(forbidden(&err), "listing Secrets as the agent: {err}");
    // ...but it lists the BGP passwords' namespace (datapath/src/bgp/node.rs).
    Api::<Secret>::namespaced(agent.clone(), BGP_SECRETS_NAMESPACE)
        .list(&ListParams::default())
        .await
        .context("the agent lists the Secrets of tendril-bgp-secrets")?;
    env.delete_on_drop::<Node>(&node_name);
    env.delete_on_drop::<NodeNetwork>(&node_name);

    run_operator_and_agent_calls(&env, &operator_kc, &agent, &agent_kc, &node_name).await
}

/// The operator, with only its token, reconciles a Node into a NodeNetwork; then the
/// agent's own calls against that NodeNetwork go through with the agent's token.
async fn run_operator_and_agent_calls(
    env: &TestEnv,
    operator_kc: &Path,
    agent: &Client,
    agent_kc: &Path,
    node_name: &str,
) -> Result<()> {
    let binary = target_bin_dir().join("tendril-operator");
    if !binary.exists() {
        bail!(
            "{} missing: cargo build -p tendril-controllers --bins",
            binary.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut op = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(operator_kc)
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--leader-elect=true")
        .arg("--leader-identity")
        .arg("rbac-test")
        .env("RUST_LOG", "info")
        .spawn()?;

    let admin = env.client();
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(node_name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes.create(&PostParams::default(), &node).await?;
    let status = json!({"status": NodeStatus {
        addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: "192.0.2.10".into() }]),
        ..Default::default()
    }});
    nodes
        .patch_status(node_name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;

    let networks: Api<NodeNetwork> = Api::all(admin.clone());
    let nn = wait_for(
        &networks,
        node_name,
        |o: Option<&NodeNetwork>| {
            o.is_some_and(|nn| nn.spec.addresses.iter().any(|a| a.address == "192.0.2.10"))
        },
        TIMEOUT,
    )
    .await
    .with_context(|| {
        format!(
            "the operator as its ServiceAccount did not reconcile the Node; log:\n{}",
            op.log_tail(40)
        )
    })?
    .ok_or_else(|| anyhow!("NodeNetwork gone"))?;
    let owner = nn.metadata.owner_references.unwrap_or_default();
    ensure!(
        owner
            .iter()
            .any(|o| o.kind == "Node" && o.name == node_name),
        "owner reference to the Node: {owner:?}"
    );
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let lease = leases.get("tendril-operator").await?;
    ensure!(
        lease.spec.and_then(|s| s.holder_identity).as_deref() == Some("rbac-test"),
        "the operator holds its Lease"
    );
    ensure!(op.is_running(), "operator exited:\n{}", op.log_tail(40));

    // The agent's calls (datapath/src/agent/node.rs): watch its NodeNetwork by field
    // selector, list Endpoints, server-side apply its status; but not the spec.
    let as_agent: Api<NodeNetwork> = Api::all(agent.clone());
    let own = as_agent
        .list(&ListParams::default().fields(&format!("metadata.name={node_name}")))
        .await?;
    ensure!(own.items.len() == 1, "the agent sees its NodeNetwork");
    let endpoints: Api<Endpoint> = Api::all(agent.clone());
    endpoints.list(&ListParams::default()).await?;
    let status = json!({
        "apiVersion": "tendril.dev/v1alpha1",
        "kind": "NodeNetwork",
        "metadata": {"name": node_name},
        "status": {"agentVersion": "rbac-test"},
    });
    as_agent
        .patch_status(
            node_name,
            &PatchParams::apply("tendril-agent").force(),
            &Patch::Apply(&status),
        )
        .await
        .context("the agent applies its NodeNetwork status")?;
    let spec = json!({
        "apiVersion": "tendril.dev/v1alpha1",
        "kind": "NodeNetwork",
        "metadata": {"name": node_name},
        "spec": {"podCIDRs": ["10.244.9.0/24"]},
    });
    let err = as_agent
        .patch(
            node_name,
            &PatchParams::apply("tendril-agent").force(),
            &Patch::Apply(&spec),
        )
        .await
        .expect_err("the agent wrote a NodeNetwork spec");
    ensure!(
        forbidden(&err),
        "writing NodeNetwork spec as the agent: {err}"
    );
    let written = networks.get(node_name).await?;
    ensure!(
        written
            .status
            .as_ref()
            .and_then(|s| s.agent_version.as_deref())
            == Some("rbac-test"),
        "the agent's status write landed"
    );

    // Another node's NodeNetwork: RBAC lets the agent patch any NodeNetwork status, the
    // admission policy (base/agent-admission.yaml) only its own node's.
    let other = unique_name("rbac-other");
    env.delete_on_drop::<Node>(&other);
    env.delete_on_drop::<NodeNetwork>(&other);
    nodes
        .create(
            &PostParams::default(),
            &Node {
                metadata: ObjectMeta {
                    name: Some(other.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    wait_for(
        &networks,
        &other,
        |o: Option<&NodeNetwork>| o.is_some(),
        TIMEOUT,
    )
    .await?;
    let foreign = json!({
        "apiVersion": "tendril.dev/v1alpha1",
        "kind": "NodeNetwork",
        "metadata": {"name": other},
        "status": {"agentVersion": "impostor"},
    });
    // The apiserver loads an admission policy asynchronously after it is applied (and
    // later still on a loaded machine): the first refusal is waited for, bounded.
    let err = eventually(TIMEOUT, || async {
        match as_agent
            .patch_status(
                &other,
                &PatchParams::apply("tendril-agent").force(),
                &Patch::Apply(&foreign),
            )
            .await
        {
            Ok(_) => bail!("the agent wrote another node's NodeNetwork status"),
            Err(e) => Ok(e),
        }
    })
    .await?;
    ensure!(
        forbidden(&err) && err.to_string().contains("only the NodeNetwork of the node"),
        "another node's status as the agent: {err}"
    );

    // Endpoints: the operator (as its ServiceAccount) makes one per running Pod; the agent
    // may write the status of those on its node only.
    let own_ep = running_pod(env, "web-own", node_name, "10.213.0.5").await?;
    let other_ep = running_pod(env, "web-other", &other, "10.213.1.5").await?;
    let endpoints_admin: Api<Endpoint> = Api::namespaced(admin.clone(), env.namespace());
    for name in [&own_ep, &other_ep] {
        wait_for(
            &endpoints_admin,
            name,
            |o: Option<&Endpoint>| o.is_some_and(|e| e.spec.identity.is_some()),
            TIMEOUT,
        )
        .await
        .with_context(|| {
            format!(
                "the operator made no Endpoint {name} with an identity; log:\n{}",
                op.log_tail(40)
            )
        })?;
    }
    let endpoints_agent: Api<Endpoint> = Api::namespaced(agent.clone(), env.namespace());
    let status_of = |name: &str| {
        json!({
            "apiVersion": "tendril.dev/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name},
            "status": {"realizedRevision": 1},
        })
    };
    endpoints_agent
        .patch_status(
            &own_ep,
            &PatchParams::apply("tendril-agent-rbac").force(),
            &Patch::Apply(&status_of(&own_ep)),
        )
        .await
        .context("the agent writes the status of an Endpoint on its node")?;
    let err = endpoints_agent
        .patch_status(
            &other_ep,
            &PatchParams::apply("tendril-agent-rbac").force(),
            &Patch::Apply(&status_of(&other_ep)),
        )
        .await
        .expect_err("the agent wrote the status of an Endpoint on another node");
    ensure!(
        forbidden(&err) && err.to_string().contains("only Endpoints on the node"),
        "another node's Endpoint status as the agent: {err}"
    );
    run_agent(env, agent_kc, node_name).await?;
    let log = op.log().to_lowercase();
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("forbidden") || has_status_403(l))
        .collect();
    ensure!(
        denied.is_empty(),
        "the operator hit an authorization failure:\n{}",
        denied.join("\n")
    );
    op.stop(Duration::from_secs(10));
    Ok(())
}

/// Whether `log` mentions HTTP status 403: the number on its own (not digits inside a
/// timestamp, port or path) and named as a status (`code: 403`, `status 403`, `403
/// Forbidden`), so a duration such as `list_ms=403` does not count.
fn has_status_403(log: &str) -> bool {
    let log = log.to_lowercase();
    log.match_indices("403").any(|(i, _)| {
        let before = &log[..i];
        let after = &log[i + 3..];
        let standalone = !before
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            && !after
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        let key = before
            .trim_end_matches([' ', ':', '=', '"'])
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        let named = matches!(key, "code" | "status" | "status_code" | "http")
            || after.trim_start().starts_with("forbidden");
        standalone && named
    })
}

#[test]
fn status_403_is_found_as_a_number_only() {
    assert!(has_status_403("error: api error 403 forbidden"));
    assert!(has_status_403("{\"code\":403}"));
    assert!(has_status_403("reason: \"Forbidden\", code: 403 })"));
    assert!(has_status_403("request failed status=403"));
    assert!(!has_status_403("2026-11-21T21:15:12.574035Z INFO ok"));
    assert!(!has_status_403("addr=127.0.0.1:34030 pid 14030"));
    assert!(!has_status_403("revision sequence started list_ms=403"));
    assert!(!has_status_403("took 403 ms"));
}

/// A Pod on `node` with `ip`, its status written as a kubelet would; returns its name.
async fn running_pod(env: &TestEnv, prefix: &str, node: &str, ip: &str) -> Result<String> {
    let name = unique_name(prefix);
    let pods: Api<Pod> = Api::namespaced(env.client(), env.namespace());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "web", "image": "web"}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(name)
}

/// A network namespace standing in for the node, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Result<Netns> {
        let name = unique_name("rbac-node");
        let status = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()?;
        ensure!(status.success(), "ip netns add {name}");
        Ok(Netns(name))
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

/// The capabilities the rendered DaemonSet gives the agent container.
async fn agent_capabilities() -> Result<Vec<String>> {
    let out = tokio::process::Command::new(k8s_bin_dir().join("kubectl"))
        .arg("kustomize")
        .arg(repo_root().join("deploy/kustomize/base"))
        .output()
        .await?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(std::str::from_utf8(&out.stdout)?)?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "tendril-agent")
        .ok_or_else(|| anyhow!("no agent DaemonSet rendered"))?;
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "agent"))
        .ok_or_else(|| anyhow!("no agent container"))?;
    ensure!(agent["securityContext"]["capabilities"]["drop"] == json!(["ALL"]));
    Ok(agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(|c| c.to_lowercase()))
        .collect())
}

/// The real `tendril-agent` as its ServiceAccount and as the DaemonSet runs it: root with
/// only the DaemonSet's capabilities (`setpriv` empties the bounding set but for them, so
/// root's capabilities after exec are exactly those). It configures a network namespace
/// this test creates (`--node-netns`) instead of the host's. It must become Ready: read
/// its NodeNetwork (pod CIDRs from the operator's ipam, which also runs as its
/// ServiceAccount), configure the gateway device in the node namespace, sync Endpoints and
/// write NodeNetwork status, with neither a 403 nor an EPERM.
async fn run_agent(env: &TestEnv, agent_kc: &Path, node_name: &str) -> Result<()> {
    let binary = target_bin_dir().join("tendril-agent");
    ensure!(
        binary.exists(),
        "{} missing: cargo build -p tendril-datapath --bins",
        binary.display()
    );
    let admin = env.client();
    // A user's pool: the operator's ipam gives the node a CIDR from it.
    let pools: Api<PodIPPool> = Api::all(admin.clone());
    let pool = unique_name("rbac-pool");
    env.delete_on_drop::<PodIPPool>(&pool);
    let body = json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "PodIPPool",
        "metadata": {"name": pool},
        "spec": {"ipv4": {"cidrs": ["10.213.0.0/24"], "maskSize": 26}},
    });
    pools
        .patch(
            &pool,
            &PatchParams::apply("rbac-test").force(),
            &Patch::Apply(&body),
        )
        .await?;
    let networks: Api<NodeNetwork> = Api::all(admin.clone());
    wait_for(
        &networks,
        node_name,
        |o: Option<&NodeNetwork>| o.is_some_and(|nn| !nn.spec.pod_cidrs.is_empty()),
        TIMEOUT,
    )
    .await
    .context("the operator's ipam (as its ServiceAccount) gave the node no pod CIDR")?;

    let caps = agent_capabilities().await?;
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let node_ns = Netns::new()?;
    // Pinned maps and links of this agent only, removed afterwards.
    let pins = Scratch(PathBuf::from("/sys/fs/bpf").join(unique_name("tendril-rbac")));
    let state = std::env::temp_dir().join(unique_name("rbac-agent"));
    let _state_cleanup = Scratch(state.clone());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut agent = Process::builder("/usr/bin/setpriv")
        .name("tendril-agent-rbac")
        .args(["--bounding-set", &bounding, "--inh-caps", "-all", "--"])
        .arg(&binary)
        .arg("--kubeconfig")
        .arg(agent_kc)
        .args(["--node-name", node_name])
        .arg("--node-netns")
        .arg(node_ns.path())
        .arg("--state-dir")
        .arg(&state)
        .arg("--bpffs-root")
        .arg(&pins.0)
        .arg("--cni-socket")
        .arg(state.join("cni.sock"))
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .spawn()?;
    let ready = |o: Option<&NodeNetwork>| {
        o.and_then(|nn| nn.status.as_ref()).is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    };
    let nn = wait_for(&networks, node_name, ready, TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "the agent as its ServiceAccount never became Ready; log:\n{}",
                agent.log_tail(40)
            )
        })?
        .ok_or_else(|| anyhow!("NodeNetwork gone"))?;
    let status = nn.status.unwrap_or_default();
    ensure!(
        status.agent_version.as_deref() == Some(env!("CARGO_PKG_VERSION")),
        "agentVersion: {:?}",
        status.agent_version
    );
    // The gateway device the agent configured inside the node namespace.
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &node_ns.0,
            "-o",
            "addr",
            "show",
            "dev",
            "tendril_host",
        ])
        .output()?;
    let addrs = String::from_utf8_lossy(&out.stdout);
    ensure!(
        addrs.contains("10.213.0."),
        "gateway address on tendril_host in the node namespace: {addrs}"
    );
    ensure!(agent.is_running(), "agent exited:\n{}", agent.log_tail(40));
    let log = agent.log().to_lowercase();
    for failure in ["forbidden", "operation not permitted", "permission denied"] {
        ensure!(
            !log.contains(failure),
            "the agent hit {failure:?}:\n{}",
            agent.log_tail(60)
        );
    }
    let denied: Vec<&str> = log.lines().filter(|l| has_status_403(l)).collect();
    ensure!(
        denied.is_empty(),
        "the agent hit a 403:\n{}",
        denied.join("\n")
    );
    agent.stop(Duration::from_secs(10));
    Ok(())
}
