//! Leader election against a real cluster of three `synod-server` processes
//! (see `support/mod.rs`). Checks that when the leading candidate's process
//! (the `election` example run as a child) is killed with SIGKILL, the next
//! candidate is elected after the session timeout, then the next, and that
//! an observer sees every leader in order with increasing tokens, then
//! nobody after the last resigns; and that a leader whose session is lost
//! (its only replica killed) learns it has lost the leadership before any
//! other candidate is elected; and that a candidate elected while its
//! replica is dead (the grant has nowhere to go) learns it leads, with the
//! right token, once its session resumes elsewhere.

mod support;

use std::time::{Duration, Instant};

use support::{example_binary, init_logging, token_in, Helper, Lines, ProcessCluster};
use synod_client::{ErrorKind, LeaderInfo};

async fn next_leader(
    leaders: &mut synod_client::LeaderStream,
    within: Duration,
) -> Option<LeaderInfo> {
    tokio::time::timeout(within, leaders.next())
        .await
        .expect("a change of leader in time")
        .expect("observing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_fails_over_when_the_leaders_process_dies_and_observers_see_every_change() {
    init_logging();
    let cluster = ProcessCluster::start().await;
    let name = "/elections/scheduler";
    let observer = cluster.client(0, 3000).await;
    let mut leaders = observer.observe(name).await.expect("observe");
    assert_eq!(
        next_leader(&mut leaders, Duration::from_secs(1)).await,
        None,
        "nobody leads at first"
    );
    let program = example_binary("election");
    let start = |first: usize, value: &str| {
        let mut command = cluster.program(&program, first, 2000);
        command
            .args([name, value, "60"])
            .stdout(std::process::Stdio::piped());
        let mut helper = Helper {
            child: command.spawn().expect("start the election example"),
        };
        let lines = Lines::of(&mut helper.child);
        (helper, lines)
    };
    let (mut first, mut first_lines) = start(1, "first");
    let elected = first_lines.expect("elected", Duration::from_secs(15)).await;
    let first_token = token_in(&elected);
    let (mut second, mut second_lines) = start(2, "second");
    second_lines
        .expect("second campaigning", Duration::from_secs(15))
        .await;
    // A third candidate in this process, queued behind the others.
    let third = cluster.client(0, 3000).await;
    let campaign = {
        let third = third.clone();
        tokio::spawn(async move { third.campaign(name, b"third").await })
    };
    let seen = next_leader(&mut leaders, Duration::from_secs(5))
        .await
        .expect("a leader");
    assert_eq!(seen.value, b"first");
    assert_eq!(seen.sequencer.generation, first_token);
    assert_eq!(
        observer
            .leader(name)
            .await
            .expect("leader")
            .map(|l| l.value),
        Some(b"first".to_vec())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let killed_at = Instant::now();
    first.kill();
    let elected = second_lines
        .expect("elected", Duration::from_secs(10))
        .await;
    let second_token = token_in(&elected);
    let after = killed_at.elapsed();
    assert!(
        after >= Duration::from_millis(1300),
        "failed over {after:?} after the kill: before the session timeout"
    );
    let seen = next_leader(&mut leaders, Duration::from_secs(5))
        .await
        .expect("a leader");
    assert_eq!(seen.value, b"second");
    assert_eq!(seen.sequencer.generation, second_token);
    assert!(second_token > first_token);
    assert!(!campaign.is_finished(), "the third candidate still waits");

    second.kill();
    let leadership = tokio::time::timeout(Duration::from_secs(10), campaign)
        .await
        .expect("the third candidate is elected")
        .expect("task")
        .expect("campaign");
    assert!(leadership.token().generation > second_token);
    assert!(third
        .check_sequencer(leadership.token())
        .await
        .expect("check"));
    let seen = next_leader(&mut leaders, Duration::from_secs(5))
        .await
        .expect("a leader");
    assert_eq!(seen.value, b"third");
    assert_eq!(seen.session, third.session_id());
    assert_eq!(&seen.sequencer, leadership.token());

    let token = leadership.token().clone();
    leadership.resign().await.expect("resign");
    assert_eq!(
        next_leader(&mut leaders, Duration::from_secs(5)).await,
        None,
        "nobody leads after the last candidate resigned"
    );
    assert!(!observer.check_sequencer(&token).await.expect("check"));
    let error = third.resign(name).await.expect_err("not campaigning");
    assert_eq!(error.kind(), ErrorKind::LockNotHeld);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_session_knows_before_anyone_else_leads() {
    init_logging();
    let mut cluster = ProcessCluster::start().await;
    let name = "/elections/lonely";
    let probe = cluster.client(0, 3000).await;
    let paxos_leader = cluster.leader(&probe).await.expect("a leader");
    // The leader of the election talks to one follower replica only, so
    // killing that replica cuts its session off for good.
    let lonely = (paxos_leader + 1) % 3;
    let other = (paxos_leader + 2) % 3;
    let session_timeout_ms = 2000;
    let leader = synod_client::Client::builder()
        .endpoints([cluster.members[lonely].client.to_string()])
        .tls(cluster.certs.client())
        .session_timeout_ms(session_timeout_ms)
        .connect()
        .await
        .expect("connect");
    let leadership = leader.campaign(name, b"lonely").await.expect("campaign");
    let candidate = cluster.client(other, 3000).await;
    let campaign = {
        let candidate = candidate.clone();
        tokio::spawn(async move {
            let leadership = candidate.campaign(name, b"next").await;
            (Instant::now(), leadership)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lost = leadership.lost();
    let killed_at = Instant::now();
    cluster.kill(lonely);
    let error = tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .expect("the leader learns it lost");
    let lost_at = Instant::now();
    assert_eq!(error.kind(), ErrorKind::LockLost, "{error}");
    assert!(!leadership.is_leader());
    let (elected_at, next) = tokio::time::timeout(Duration::from_secs(10), campaign)
        .await
        .expect("the next candidate is elected")
        .expect("task");
    let next = next.expect("campaign");
    assert!(
        lost_at <= elected_at,
        "the old leader learned of its loss {:?} after the kill, the new one was elected {:?} after it",
        lost_at - killed_at,
        elected_at - killed_at
    );
    assert!(next.token().generation > leadership.token().generation);
    let error = leadership.resign().await.expect_err("nothing to resign");
    assert_eq!(error.kind(), ErrorKind::LockLost);
    let error = leader.sync().await.expect_err("the session is gone");
    assert_eq!(error.kind(), ErrorKind::SessionExpired, "{error}");
    next.resign().await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_elected_while_it_moves_between_replicas_learns_it_leads() {
    init_logging();
    let mut cluster = ProcessCluster::start().await;
    let name = "/elections/moving";
    let probe = cluster.client(0, 3000).await;
    let paxos_leader = cluster.leader(&probe).await.expect("a leader");
    let follower = (paxos_leader + 1) % 3;
    let incumbent = cluster.client(paxos_leader, 3000).await;
    let candidate = cluster.client(follower, 3000).await;
    let leadership = incumbent
        .campaign(name, b"incumbent")
        .await
        .expect("campaign");
    let campaign = {
        let candidate = candidate.clone();
        tokio::spawn(async move { candidate.campaign(name, b"candidate").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!campaign.is_finished());
    // Elected while its replica is dead: the grant has nowhere to go.
    cluster.kill(follower);
    let token = leadership.token().clone();
    leadership.resign().await.expect("resign");
    let elected = tokio::time::timeout(Duration::from_secs(10), campaign)
        .await
        .expect("the candidate learns it leads after resuming")
        .expect("task")
        .expect("campaign");
    assert!(elected.token().generation > token.generation);
    let leader = incumbent
        .leader(name)
        .await
        .expect("leader")
        .expect("someone leads");
    assert_eq!(leader.session, candidate.session_id());
    assert_eq!(&leader.sequencer, elected.token());
    assert_eq!(leader.value, b"candidate");
    elected.resign().await.expect("resign");
}
