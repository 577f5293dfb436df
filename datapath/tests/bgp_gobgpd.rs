//! The agent's BGP plumbing against a real gobgpd (no Kubernetes, no peer): the supervisor
//! starts it with its API on a unix socket, the speaker calls configure it and read it back
//! (the local paths as ListPath reports them, with their communities), a killed daemon is
//! restarted as a new epoch that holds nothing, and a daemon no longer wanted is stopped.
//! Needs `gobgpd` (hack/install-prereqs.sh).

use anyhow::{Context, Result, ensure};
use std::collections::BTreeMap;
use std::time::Duration;
use tendril_datapath::agent::view::Wake;
use tendril_datapath::bgp::daemon::{Daemon, DaemonConfig, DaemonState};
use tendril_datapath::bgp::desired::{Password, PathSpec, PeerSpec, Speaker};
use tendril_datapath::bgp::metrics::BgpMetrics;
use tendril_datapath::bgp::{api, speaker};
use tendril_runtime::Metrics;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

async fn wait_state(daemon: &Daemon, want: impl Fn(DaemonState) -> bool) -> Result<DaemonState> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = daemon.state();
        if want(state) {
            return Ok(state);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "daemon state {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gobgpd_is_supervised_and_configured_through_its_api() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("bgp").join("gobgpd.sock");
    let metrics = BgpMetrics::register(&Metrics::new("test"));
    let shutdown = CancellationToken::new();
    let daemon = Daemon::spawn(
        DaemonConfig {
            gobgpd: "gobgpd".into(),
            socket: socket.clone(),
            netns: None,
            restart_min: Duration::from_millis(100),
            restart_max: Duration::from_millis(500),
        },
        metrics.clone(),
        Wake::default(),
        shutdown.clone(),
    );
    ensure!(daemon.state() == DaemonState::Stopped, "started unasked");
    daemon.want(true);
    let first = wait_state(&daemon, |s| s != DaemonState::Stopped).await?;
    ensure!(first == DaemonState::Running { epoch: 1 }, "{first:?}");
    ensure!(metrics.daemon_up.get() == 1);

    let mut client = api::connect(&socket).await?;
    ensure!(
        speaker::global(&mut client).await?.is_none(),
        "a speaker before StartBgp"
    );
    let me = Speaker {
        asn: 64512,
        router_id: "192.0.2.10".parse()?,
    };
    speaker::start(&mut client, &me, -1).await?;
    ensure!(speaker::global(&mut client).await? == Some(me.clone()));

    // A peer (it never comes up: nobody listens there), with a TCP MD5 password gobgpd
    // takes, and two paths.
    let peer = PeerSpec {
        address: "192.0.2.1".parse()?,
        peer_asn: 65000,
        port: 179,
        multihop_ttl: 1,
        connect_retry_seconds: 5,
        hold_time_seconds: 9,
        keepalive_seconds: 3,
        graceful_restart_seconds: Some(60),
        password: Some(Password::new("s3cret")),
    };
    speaker::add_peer(&mut client, &peer, true).await?;
    let peers = speaker::peers(&mut client).await?;
    let status = speaker::session_status(&peers[0], me.asn).context("session status")?;
    ensure!(
        status.peer_address == "192.0.2.1"
            && status.peer_asn == 65000
            && status.state != "Established",
        "{status:?}"
    );
    let paths = [
        PathSpec {
            prefix: "10.200.0.0/24".parse()?,
            ..PathSpec::default()
        },
        PathSpec {
            prefix: "198.51.100.7/32".parse()?,
            communities: vec![65000 << 16 | 100],
            large_communities: vec![(65000, 1, 2)],
        },
        PathSpec {
            prefix: "2001:db8:1::/64".parse()?,
            ..PathSpec::default()
        },
    ];
    for path in &paths {
        speaker::add_path(&mut client, path).await?;
    }
    let held = speaker::local_paths(&mut client).await?;
    let expected: BTreeMap<_, _> = paths.iter().map(|p| (p.prefix, p.clone())).collect();
    ensure!(held == expected, "ListPath: {held:?}");
    speaker::delete_path(&mut client, &paths[1]).await?;
    let held = speaker::local_paths(&mut client).await?;
    ensure!(
        held.len() == 2 && !held.contains_key(&paths[1].prefix),
        "after DeletePath: {held:?}"
    );
    speaker::delete_peer(&mut client, peer.address).await?;
    ensure!(speaker::peers(&mut client).await?.is_empty());

    // Killed: restarted as epoch 2, which holds nothing (gobgpd's state is in memory).
    let pid = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("gobgpd\0") && c.contains(socket.to_str().unwrap()))
        })
        .context("the daemon's process")?;
    // SAFETY: a signal to the gobgpd this test's supervisor started (found by its socket).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let second = wait_state(&daemon, |s| s == DaemonState::Running { epoch: 2 }).await?;
    ensure!(
        metrics.daemon_restarts.get() == 1,
        "restarts {}",
        metrics.daemon_restarts.get()
    );
    let mut client = api::connect(&socket).await?;
    ensure!(
        speaker::global(&mut client).await?.is_none(),
        "{second:?} kept a speaker"
    );

    // No longer wanted: stopped, and not restarted.
    daemon.want(false);
    wait_state(&daemon, |s| s == DaemonState::Stopped).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(daemon.state() == DaemonState::Stopped && metrics.daemon_up.get() == 0);
    ensure!(
        metrics.daemon_restarts.get() == 1,
        "a stop counted as a restart"
    );
    shutdown.cancel();
    Ok(())
}
