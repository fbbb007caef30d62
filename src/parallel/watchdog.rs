//! The collective watchdog: no rank waits forever for a peer that stopped, died or was cut off.
//!
//! Every rank's heartbeat thread tells its partners, every tenth of the timeout, that it is alive
//! (the MPI side is in `mpi.rs`); it runs beside whatever the rank's main thread does, so a rank
//! busy computing, loading or waiting in a collective of its own still beats. Partners: world
//! rank 0 and every other rank (the world leader waits on everyone in the world's collectives),
//! and the ranks of one replica with each other; so a job of n ranks keeps O(n) connections for
//! heartbeats, not n². A rank judges only its partners' silence: in a world collective the
//! others hear of a silent rank from rank 0, which aborts the job. Each
//! collective (and each step-plan exchange, which is a broadcast) registers a [`Wait`] while it
//! runs. A wait that has lasted `--collective-timeout` while one of the peers it waits for has
//! been silent as long ends the job: the rank names itself, the collective and that peer, and
//! aborts. A long wait on live peers (a replica that finishes early and waits for the others, a
//! worker's idle tensor-parallel peers) is no hang and is left alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default `--collective-timeout`, seconds: far above a step's time and a model load's pauses.
pub const DEFAULT_TIMEOUT_S: f64 = 180.0;

static TIMEOUT_MS: AtomicU64 = AtomicU64::new((DEFAULT_TIMEOUT_S * 1000.0) as u64);

/// Set `--collective-timeout` (seconds, > 0) for this process.
pub fn set_timeout(secs: f64) {
    TIMEOUT_MS.store((secs * 1000.0).round().max(1.0) as u64, Ordering::Relaxed);
}

/// The current `--collective-timeout`.
pub fn timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed))
}

/// How often a rank says it is alive: a tenth of the timeout, between 0.1 and 10 s.
pub fn beat_interval() -> Duration {
    (timeout() / 10).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

/// A group of ranks a collective runs over: "replica 1", "the world".
#[derive(Debug)]
pub struct Group {
    pub label: String,
    /// World ranks of the members, in group-rank order.
    pub members: Vec<usize>,
}

/// One collective in progress on this rank.
#[derive(Debug)]
struct Wait {
    id: u64,
    what: &'static str,
    /// The n-th collective over this group on this rank.
    n: u64,
    group: Arc<Group>,
    /// The world rank that sends (a broadcast): the one a receiver waits for.
    root: Option<usize>,
    since: Instant,
}

struct State {
    waits: Vec<Wait>,
    /// Last heartbeat from each world rank.
    seen: Vec<Instant>,
    /// Ranks that said goodbye (they stop beating on their way out).
    left: Vec<bool>,
    /// The ranks this one beats to and hears from.
    partner: Vec<bool>,
    next_id: u64,
}

/// What this rank knows about its peers' liveness and its own waits.
pub struct Watchdog {
    me: usize,
    hosts: Vec<String>,
    state: Mutex<State>,
}

/// Clears its wait when the collective returns.
pub struct WaitGuard<'a> {
    dog: &'a Watchdog,
    id: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.dog.lock().waits.retain(|w| w.id != self.id);
    }
}

impl Watchdog {
    /// World rank `me` of a world whose ranks run on `hosts` (one per world rank).
    pub fn new(me: usize, hosts: Vec<String>) -> Self {
        let now = Instant::now();
        let n = hosts.len();
        let partner = (0..n).map(|p| p != me && (me == 0 || p == 0)).collect();
        Watchdog {
            me,
            state: Mutex::new(State {
                waits: Vec::new(),
                seen: vec![now; n],
                left: vec![false; n],
                partner,
                next_id: 0,
            }),
            hosts,
        }
    }

    /// Beat to and watch `ranks` too (this rank's replica peers), from now on.
    pub fn add_partners(&self, ranks: impl IntoIterator<Item = usize>) {
        let now = Instant::now();
        let mut s = self.lock();
        for p in ranks {
            if p != self.me && p < s.partner.len() && !s.partner[p] {
                s.partner[p] = true;
                s.seen[p] = now;
            }
        }
    }

    /// The ranks this one beats to.
    pub fn partners(&self) -> Vec<usize> {
        let s = self.lock();
        (0..s.partner.len()).filter(|&p| s.partner[p]).collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register the `n`-th collective `what` over `group` until the guard drops.
    pub fn begin(
        &self,
        what: &'static str,
        n: u64,
        group: &Arc<Group>,
        root: Option<usize>,
    ) -> WaitGuard<'_> {
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.waits.push(Wait {
            id,
            what,
            n,
            group: group.clone(),
            root,
            since: Instant::now(),
        });
        WaitGuard { dog: self, id }
    }

    /// A heartbeat (or, `bye`, the last one) from world rank `from`.
    pub fn heard(&self, from: usize, bye: bool, now: Instant) {
        let mut s = self.lock();
        if let Some(t) = s.seen.get_mut(from) {
            *t = now;
        }
        if bye {
            if let Some(l) = s.left.get_mut(from) {
                *l = true;
            }
        }
    }

    /// The abort message when a wait has lasted `timeout` and a peer it waits for has been
    /// silent as long; `None`: keep waiting.
    pub fn verdict(&self, now: Instant, timeout: Duration) -> Option<String> {
        let s = self.lock();
        for w in &s.waits {
            let waited = now.saturating_duration_since(w.since);
            if waited < timeout {
                continue;
            }
            // A receiver of a broadcast waits for the root; anything else for every member.
            let root = w.root.filter(|&r| r != self.me);
            let silent = root
                .into_iter()
                .chain(w.group.members.iter().copied())
                .filter(|&p| s.partner.get(p).copied().unwrap_or(false) && !s.left[p])
                .find(|&p| now.saturating_duration_since(s.seen[p]) >= timeout);
            if let Some(p) = silent {
                // Name the innermost wait on that peer (an all-reduce inside a step's forward,
                // rather than the forward): the most precise account of where the rank hangs.
                let w = s
                    .waits
                    .iter()
                    .rev()
                    .find(|v| v.root == Some(p) || v.group.members.contains(&p))
                    .unwrap_or(w);
                let waited = now.saturating_duration_since(w.since);
                let host = |r: usize| self.hosts.get(r).map_or("?", String::as_str);
                return Some(format!(
                    "rank {} ({}) waited {:.0} s in {} #{} over {} for rank {} on node {}, which has \
                     not been heard from for {:.0} s (stopped, dead, or cut off from this node): \
                     aborting the job (--collective-timeout {:.0} s)",
                    self.me,
                    host(self.me),
                    waited.as_secs_f64(),
                    w.what,
                    w.n,
                    w.group.label,
                    p,
                    host(p),
                    now.saturating_duration_since(s.seen[p]).as_secs_f64(),
                    timeout.as_secs_f64()
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_wait_on_the_silent_peer_is_named() {
        let hosts: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let dog = Watchdog::new(0, hosts);
        let t = Duration::from_secs(10);
        let replica = Arc::new(Group {
            label: "replica 0".into(),
            members: vec![0, 1],
        });
        let t0 = Instant::now();
        let _step = dog.begin("a step's forward", 4, &replica, None);
        std::thread::sleep(Duration::from_millis(5));
        let _inner = dog.begin("all_reduce_sum", 9, &replica, None);
        // At the first verdict only the outer wait has lasted the timeout; the inner one is named.
        let at = t0 + t + Duration::from_millis(1);
        let msg = dog.verdict(at, t).unwrap();
        assert!(msg.contains("in all_reduce_sum #9 over replica 0"), "{msg}");
    }

    #[test]
    fn a_wait_on_a_silent_peer_fires_one_on_live_peers_does_not() {
        let hosts: Vec<String> = ["a", "a", "b", "b"].map(String::from).to_vec();
        let dog = Watchdog::new(0, hosts);
        let t = Duration::from_secs(10);
        let world = Arc::new(Group {
            label: "the world".into(),
            members: vec![0, 1, 2, 3],
        });
        let t0 = Instant::now();
        let g = dog.begin("barrier", 3, &world, None);
        // Everyone beats: a long wait is no hang.
        for p in 1..4 {
            dog.heard(p, false, t0 + Duration::from_secs(25));
        }
        assert_eq!(dog.verdict(t0 + Duration::from_secs(30), t), None);
        // Rank 2 goes silent; rank 1 says goodbye (it is on its way out, not gone missing).
        dog.heard(1, true, t0 + Duration::from_secs(31));
        dog.heard(3, false, t0 + Duration::from_secs(40));
        let msg = dog.verdict(t0 + Duration::from_secs(41), t).unwrap();
        assert!(
            msg.starts_with("rank 0 (a) waited ")
                && msg.contains("in barrier #3 over the world for rank 2 on node b")
                && msg.contains("--collective-timeout 10 s"),
            "{msg}"
        );
        drop(g);
        assert_eq!(dog.verdict(t0 + Duration::from_secs(60), t), None);
        // A broadcast's receiver names the root first.
        let replica = Arc::new(Group {
            label: "replica 1".into(),
            members: vec![2, 3],
        });
        let dog = Watchdog::new(3, ["a", "a", "b", "b"].map(String::from).to_vec());
        assert_eq!(dog.partners(), vec![0]);
        dog.add_partners([2, 3]);
        assert_eq!(dog.partners(), vec![0, 2]);
        let g = dog.begin("broadcast", 0, &replica, Some(2));
        let later = Instant::now() + Duration::from_secs(11);
        let msg = dog.verdict(later, t).unwrap();
        assert!(msg.contains("for rank 2 on node b"), "{msg}");
        drop(g);
        // Rank 1 beats to rank 0 only: rank 3 leaves judging it to rank 0.
        let _g = dog.begin("barrier", 1, &world, None);
        dog.heard(0, false, later);
        dog.heard(2, false, later);
        assert_eq!(dog.verdict(later, t), None);
    }
}
