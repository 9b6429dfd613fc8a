//! Locks against a real cluster of three `synod-server` processes (see
//! `support/mod.rs`). Checks that clients contending for one lock through
//! different replicas hold it one at a time with strictly increasing fencing
//! tokens, and that a downstream service checking tokens refuses a former
//! holder; that try-lock, acquire with a timeout, an abandoned acquire and
//! shared locks behave;
//! that killing (SIGKILL) the replica a holder is connected to does not lose
//! the lock while the session survives the failover; and that killing the
//! holder's own process (the `lock` example run as a child) releases the
//! lock after the session timeout and not before, to the next waiter; and
//! that a waiter whose replica dies just as the lock is granted to it (the
//! grant has nowhere to go) still ends up holding it, with a token it
//! knows.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{example_binary, init_logging, token_in, Helper, Lines, ProcessCluster};
use synod_client::{ClientError, ErrorKind, LockOptions, SessionState};

/// A downstream service that refuses any token older than the newest it
/// has seen, as a storage service fencing writes would.
#[derive(Default)]
struct Downstream {
    newest: Mutex<u64>,
}

impl Downstream {
    fn accept(&self, generation: u64) -> bool {
        let mut newest = self.newest.lock().expect("not poisoned");
        if generation < *newest {
            return false;
        }
        *newest = generation;
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_clients_hold_the_lock_one_at_a_time_with_increasing_tokens() {
    init_logging();
    let cluster = ProcessCluster::start().await;
    let inside = Arc::new(AtomicBool::new(false));
    let grants: Arc<Mutex<Vec<u64>>> = Arc::default();
    let downstream = Arc::new(Downstream::default());
    let mut tasks = Vec::new();
    for index in 0..4 {
        let client = cluster.client(index % 3, 3000).await;
        let (inside, grants, downstream) = (inside.clone(), grants.clone(), downstream.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..4 {
                let guard = client.lock("/locks/contended").await.expect("lock");
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                let generation = guard.token().generation;
                grants.lock().expect("not poisoned").push(generation);
                assert!(
                    downstream.accept(generation),
                    "a holder's token was refused"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
                inside.store(false, Ordering::SeqCst);
                mine.push(guard.token().clone());
                guard.release().await.expect("release");
            }
            (client, mine)
        }));
    }
    let mut former = Vec::new();
    let mut clients = Vec::new();
    for task in tasks {
        let (client, tokens) = task.await.expect("contender");
        former.extend(tokens);
        clients.push(client);
    }
    let grants = grants.lock().expect("not poisoned").clone();
    assert_eq!(grants.len(), 16);
    assert!(
        grants.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens strictly increase in grant order: {grants:?}"
    );
    // A former holder's token is refused downstream, and by the cluster.
    let checker = &clients[0];
    let current = checker.lock("/locks/contended").await.expect("lock again");
    assert!(downstream.accept(current.token().generation));
    for stale in &former {
        assert!(!downstream.accept(stale.generation), "stale token accepted");
        assert!(!checker.check_sequencer(stale).await.expect("check"));
    }
    assert!(checker
        .check_sequencer(current.token())
        .await
        .expect("check"));
    checker
        .create("/fenced", b"", synod_client::CreateMode::Persistent)
        .await
        .expect("create");
    checker
        .set_fenced("/fenced", b"by the holder", current.token())
        .await
        .expect("the holder writes");
    let error = clients[1]
        .set_fenced("/fenced", b"by a former holder", &former[0])
        .await
        .expect_err("a stale token cannot write");
    assert_eq!(error.kind(), ErrorKind::StaleSequencer, "{error}");
    current.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_timeouts_shared_locks_and_release_on_drop() {
    init_logging();
    let cluster = ProcessCluster::start().await;
    let a = cluster.client(0, 3000).await;
    let b = cluster.client(1, 3000).await;
    let held = a.lock("/locks/t").await.expect("lock");
    let busy = b.try_lock("/locks/t").await.expect_err("busy");
    assert_eq!(busy.kind(), ErrorKind::LockBusy, "{busy}");
    assert!(busy.to_string().contains("retry later"), "{busy}");
    let again = a.lock("/locks/t").await.expect_err("already held here");
    assert_eq!(again.kind(), ErrorKind::LockAlreadyRequested);
    let started = Instant::now();
    let timed_out = b
        .lock_timeout("/locks/t", Duration::from_millis(500))
        .await
        .expect_err("times out");
    assert_eq!(timed_out.kind(), ErrorKind::Timeout, "{timed_out}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // Giving up the wait left no place in the queue: after a release the
    // lock is free for a try-lock.
    let first_token = held.token().clone();
    drop(held); // released without waiting
    let ok = support::eventually(Duration::from_secs(5), || async {
        match b.try_lock("/locks/t").await {
            Ok(guard) => {
                assert!(guard.token().generation > first_token.generation);
                guard.release().await.expect("release");
                true
            }
            Err(error) => {
                assert_eq!(error.kind(), ErrorKind::LockBusy, "{error}");
                false
            }
        }
    })
    .await;
    assert!(ok, "a dropped guard releases the lock");

    // An acquire abandoned by a timeout around it gives up its place: the
    // lock is not granted to a session nobody waits in.
    let held = a.lock("/locks/abandoned").await.expect("lock");
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), b.lock("/locks/abandoned")).await;
    assert!(abandoned.is_err(), "still waiting when abandoned");
    held.release().await.expect("release");
    let free = support::eventually(Duration::from_secs(5), || async {
        match a.try_lock("/locks/abandoned").await {
            Ok(guard) => guard.release().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(free, "the abandoned wait was given up");

    // Shared holders together; an exclusive waiter after them.
    let reader_a = a.lock_shared("/locks/s").await.expect("shared");
    let reader_b = b.lock_shared("/locks/s").await.expect("shared too");
    let writer = cluster.client(2, 3000).await;
    let waiting = tokio::spawn(async move {
        let guard = writer
            .lock_with("/locks/s", LockOptions::exclusive())
            .await
            .expect("exclusive");
        (writer, guard)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the exclusive waiter waits for readers"
    );
    reader_a.release().await.expect("release");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "one reader still holds it");
    let reader_token = reader_b.token().generation;
    reader_b.release().await.expect("release");
    let (writer, guard) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("granted after the readers left")
        .expect("task");
    assert!(guard.token().generation > reader_token);
    guard.release().await.expect("release");
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holders_replica_does_not_lose_the_lock() {
    init_logging();
    let mut cluster = ProcessCluster::start().await;
    let probe = cluster.client(0, 3000).await;
    // The hardest replica to lose is the Paxos leader: the session must
    // move while a new leader is elected.
    let leader = cluster.leader(&probe).await.expect("a leader");
    let holder = cluster.client(leader, 3000).await;
    assert_eq!(cluster.serving(&holder), Some(leader));
    let waiter = cluster.client((leader + 1) % 3, 3000).await;
    let guard = holder.lock("/locks/failover").await.expect("lock");
    let token = guard.token().clone();
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.lock("/locks/failover").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut states = holder.state_changes();
    cluster.kill(leader);
    // The holder's session moves to another replica.
    let resumed = tokio::time::timeout(Duration::from_secs(6), async {
        let mut suspended = false;
        while let Some(state) = states.next().await {
            match state {
                SessionState::Suspended => suspended = true,
                SessionState::Connected { node_id, .. } if suspended => return node_id,
                other => assert!(!other.is_ended(), "the session ended: {other:?}"),
            }
        }
        panic!("state stream ended");
    })
    .await
    .expect("the holder's session resumes");
    assert_ne!(cluster.index_of(resumed), leader);
    // Well past the session timeout, the lock is still the holder's.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(guard.is_held());
    assert!(holder.check_sequencer(&token).await.expect("check"));
    assert!(waiter.check_sequencer(&token).await.expect("check"));
    assert!(
        !waiting.is_finished(),
        "the waiter must not get a held lock"
    );
    guard.release().await.expect("release after the failover");
    let next = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter is granted")
        .expect("task")
        .expect("lock");
    assert!(next.token().generation > token.generation);
    next.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holders_process_releases_the_lock_after_the_session_timeout() {
    init_logging();
    let cluster = ProcessCluster::start().await;
    let session_timeout_ms = 2000;
    let program = example_binary("lock");
    let mut command = cluster.program(&program, 1, session_timeout_ms);
    command
        .args(["/locks/process", "60"])
        .stdout(std::process::Stdio::piped());
    let mut holder = Helper {
        child: command.spawn().expect("start the lock example"),
    };
    let mut lines = Lines::of(&mut holder.child);
    let acquired = lines.expect("acquired", Duration::from_secs(15)).await;
    let holder_token = token_in(&acquired);
    let waiter = cluster.client(2, 3000).await;
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.lock("/locks/process").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the lock is held by the process");
    let killed_at = Instant::now();
    holder.kill();
    let guard = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter gets the lock after the holder's session expires")
        .expect("task")
        .expect("lock");
    let after = killed_at.elapsed();
    // The holder's keep-alives came every sixth of its timeout, so its
    // session expired between five sixths of the timeout and the whole of it
    // (plus the time for the expiry to commit) after the kill.
    assert!(
        after >= Duration::from_millis(session_timeout_ms * 2 / 3),
        "released {after:?} after the kill: too soon"
    );
    assert!(
        after <= Duration::from_millis(session_timeout_ms + 3000),
        "released {after:?} after the kill: too late"
    );
    assert!(guard.token().generation > holder_token);
    let stale = synod_client::Sequencer {
        generation: holder_token,
        ..guard.token().clone()
    };
    assert!(!waiter.check_sequencer(&stale).await.expect("check"));
    guard.release().await.expect("release");
    let error = waiter
        .lock_with("/locks/process", LockOptions::exclusive().try_once())
        .await
        .map(|guard| guard.token().generation);
    assert!(
        !matches!(error, Err(ClientError::SessionExpired)),
        "the waiter's session is fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_made_while_the_waiter_moves_between_replicas_is_not_lost() {
    init_logging();
    let mut cluster = ProcessCluster::start().await;
    let probe = cluster.client(0, 3000).await;
    let leader = cluster.leader(&probe).await.expect("a leader");
    // The waiter sits on a follower; the holder on the Paxos leader, which
    // stays up.
    let follower = (leader + 1) % 3;
    let holder = cluster.client(leader, 3000).await;
    let waiter = cluster.client(follower, 3000).await;
    let guard = holder.lock("/locks/moving").await.expect("lock");
    let token = guard.token().clone();
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.lock("/locks/moving").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The grant is made while the waiter's replica is dead: it has nowhere
    // to go, and no replica sends it again when the waiter resumes.
    cluster.kill(follower);
    guard.release().await.expect("release");
    let granted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter gets the lock after resuming")
        .expect("task")
        .expect("lock");
    assert!(granted.token().generation > token.generation);
    assert!(granted.is_held());
    assert!(holder
        .check_sequencer(granted.token())
        .await
        .expect("check"));
    let busy = holder.try_lock("/locks/moving").await.expect_err("held");
    assert_eq!(busy.kind(), ErrorKind::LockBusy, "{busy}");
    granted.release().await.expect("release");
    let again = holder.try_lock("/locks/moving").await.expect("free again");
    again.release().await.expect("release");
}
