//! The two helper threads that keep HTTP off the generation loop: the poller (job requests, login
//! again after an outage) and the outbox (progress and results, one request in flight at a time).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::{ApiError, Client, JobReply, JobResult, LoginReply, Progress, ResultReply};

/// Whether the server answers, logged once per change (not once per failed request).
pub struct Link {
    url: String,
    /// `Some(true)` online, `Some(false)` offline since the instant.
    online: Mutex<(Option<bool>, Instant)>,
}

impl Link {
    pub fn new(url: &str) -> Link {
        Link {
            url: url.to_string(),
            online: Mutex::new((None, Instant::now())),
        }
    }

    /// A request sent at `sent` was answered. One sent before the server went away says
    /// nothing about now (it was accepted before the outage), so it does not flip the state.
    pub fn up(&self, sent: Instant) {
        let mut s = lock(&self.online);
        if s.0 == Some(false) {
            if sent < s.1 {
                return;
            }
            tracing::info!(url = %self.url, "API server reachable again");
        }
        *s = (Some(true), Instant::now());
    }

    pub fn down(&self, e: &ApiError) {
        let mut s = lock(&self.online);
        if s.0 != Some(false) {
            tracing::warn!("{e}; retrying with backoff (generation goes on)");
            *s = (Some(false), Instant::now());
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exponential backoff from 250 ms to 5 s; `delay` gives the next wait.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::ZERO)
    }
}

impl Backoff {
    pub fn delay(&mut self) -> Duration {
        self.0 = (self.0 * 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
        self.0
    }
    pub fn reset(&mut self) {
        self.0 = Duration::ZERO;
    }
}

/// Sleep `d`, waking early when `stop` is set.
fn nap(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// What the poller hands the generation loop.
pub enum Inbox {
    /// Raw job records (each validated by the loop; one bad record fails alone).
    Jobs(Vec<serde_json::Value>),
    /// The server refused this worker: end the worker with this message.
    Fatal(String),
}

/// The job-request side: asks for as many jobs as there are free slots.
pub struct Poller {
    pub client: Arc<Client>,
    pub link: Arc<Link>,
    /// Jobs handed to the loop and not yet answered (the loop decrements it).
    pub outstanding: Arc<AtomicUsize>,
    pub max_batch: usize,
    pub stop: Arc<AtomicBool>,
    pub tx: Sender<Inbox>,
    /// The server's long poll (from the login).
    pub request_timeout: Duration,
    /// The long poll asked for while sequences run: short, so that the batch size asked for
    /// follows the slots that free up.
    pub busy_timeout: Duration,
}

impl Poller {
    pub fn run(mut self) {
        let mut logged_in = true;
        let mut backoff = Backoff::default();
        let mut last_note = String::new();
        while !self.stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            if !logged_in {
                match self.client.login() {
                    Ok(LoginReply::Accepted {
                        request_timeout, ..
                    }) => {
                        self.link.up(sent);
                        tracing::info!(worker = %self.client.identity().auth, "logged in again");
                        self.request_timeout = request_timeout;
                        logged_in = true;
                        backoff.reset();
                    }
                    Ok(LoginReply::Refused(msg)) => {
                        let _ = self.tx.send(Inbox::Fatal(format!(
                            "the API server at {} refused the login: {msg}",
                            self.client.url()
                        )));
                        return;
                    }
                    Err(e) => {
                        self.note_failure(&e);
                        nap(backoff.delay(), &self.stop);
                    }
                }
                continue;
            }
            let busy = self.outstanding.load(Ordering::SeqCst);
            let free = self.max_batch.saturating_sub(busy);
            if free == 0 {
                nap(Duration::from_millis(5), &self.stop);
                continue;
            }
            // Long-poll for the server's full time only when idle.
            let wait = if busy == 0 {
                self.request_timeout
            } else {
                self.busy_timeout.min(self.request_timeout)
            };
            match self.client.job_request(free, wait) {
                Ok(JobReply::Jobs(jobs)) => {
                    self.link.up(sent);
                    backoff.reset();
                    self.outstanding.fetch_add(jobs.len(), Ordering::SeqCst);
                    if self.tx.send(Inbox::Jobs(jobs)).is_err() {
                        return;
                    }
                }
                Ok(JobReply::NoJob) => {
                    self.link.up(sent);
                    backoff.reset();
                }
                Ok(JobReply::Warning(msg)) => {
                    self.link.up(sent);
                    if msg != last_note {
                        tracing::warn!("API server: {msg}");
                        last_note = msg;
                    }
                    nap(backoff.delay(), &self.stop);
                }
                Ok(JobReply::Error(msg)) => {
                    // The server no longer knows us (restarted) or no longer accepts us: a new
                    // login tells which.
                    self.link.up(sent);
                    tracing::warn!("API server: {msg}; logging in again");
                    logged_in = false;
                    nap(backoff.delay(), &self.stop);
                }
                Err(e) => {
                    if e.is_unreachable() {
                        // A server that comes back may be a restarted one: log in again.
                        logged_in = false;
                    }
                    self.note_failure(&e);
                    nap(backoff.delay(), &self.stop);
                }
            }
        }
    }

    fn note_failure(&self, e: &ApiError) {
        if e.is_unreachable() {
            self.link.down(e);
        } else {
            tracing::warn!("job request: {e}");
        }
    }
}

#[derive(Default)]
struct OutState {
    /// The newest progress per job (older ones are superseded, never queued).
    progress: BTreeMap<String, Progress>,
    results: VecDeque<JobResult>,
    /// Results taken off the queue but not yet answered.
    sending: usize,
    closed: bool,
    /// After this, results that cannot be delivered are dropped (shutdown).
    give_up_at: Option<Instant>,
    delivered: usize,
}

/// Progress and results waiting to be sent; filled by the loop, emptied by [`run_outbox`].
#[derive(Default)]
pub struct Outbox {
    state: Mutex<OutState>,
    cv: Condvar,
}

impl Outbox {
    /// Replace the job's pending progress with a newer one.
    pub fn progress(&self, p: Progress) {
        lock(&self.state).progress.insert(p.job_id.clone(), p);
        self.cv.notify_all();
    }

    /// Queue a job's result; its pending progress is dropped (the result supersedes it).
    pub fn result(&self, r: JobResult) {
        let mut s = lock(&self.state);
        s.progress.remove(&r.job_id);
        s.results.push_back(r);
        drop(s);
        self.cv.notify_all();
    }

    /// No more work will come; results queued so far are still sent.
    pub fn close(&self, give_up_at: Instant) {
        let mut s = lock(&self.state);
        s.closed = true;
        s.give_up_at = Some(give_up_at);
        drop(s);
        self.cv.notify_all();
    }

    /// Wait until every queued result is answered (or dropped), at most until `deadline`; the
    /// number of results delivered so far.
    pub fn wait_drained(&self, deadline: Instant) -> (bool, usize) {
        let mut s = lock(&self.state);
        loop {
            if s.results.is_empty() && s.sending == 0 {
                return (true, s.delivered);
            }
            let now = Instant::now();
            if now >= deadline {
                return (false, s.delivered);
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

enum Work {
    Result(JobResult),
    Progress(Vec<Progress>),
}

/// The outbox thread: results first (each exactly once, retried while the server is away), then
/// all pending progress in one request.
pub fn run_outbox(outbox: Arc<Outbox>, client: Arc<Client>, link: Arc<Link>) {
    let mut backoff = Backoff::default();
    // Jobs whose progress the server refused (unknown to it, e.g. after a restart): a progress
    // for an unknown job makes it answer 500 to the whole request, so they get none any more.
    let mut muted: HashSet<String> = HashSet::new();
    let never = AtomicBool::new(false);
    loop {
        let work = {
            let mut s = lock(&outbox.state);
            loop {
                if let Some(r) = s.results.pop_front() {
                    s.sending += 1;
                    break Work::Result(r);
                }
                if !s.progress.is_empty() {
                    let items = std::mem::take(&mut s.progress)
                        .into_values()
                        .filter(|p| !muted.contains(&p.job_id))
                        .collect();
                    break Work::Progress(items);
                }
                if s.closed {
                    return;
                }
                s = outbox.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        match work {
            Work::Result(r) => {
                let mut sent;
                let delivered = loop {
                    sent = Instant::now();
                    match client.result(&r) {
                        Ok(ResultReply::Ok) => break true,
                        Ok(ResultReply::Warning(msg)) => {
                            tracing::warn!(job = %r.job_id, "API server on the result: {msg}");
                            break true;
                        }
                        Err(e) if e.is_unreachable() => {
                            link.down(&e);
                            let give_up = lock(&outbox.state).give_up_at;
                            if give_up.is_some_and(|t| Instant::now() >= t) {
                                tracing::error!(job = %r.job_id, "result not delivered before shutdown: {e}");
                                break false;
                            }
                            nap(backoff.delay(), &never);
                        }
                        // Any HTTP answer means the server saw the result: sending it again could
                        // make it a second result for the job.
                        Err(e) => {
                            tracing::warn!(job = %r.job_id, "result: {e}");
                            break false;
                        }
                    }
                };
                if delivered {
                    link.up(sent);
                    backoff.reset();
                }
                muted.remove(&r.job_id);
                let mut s = lock(&outbox.state);
                s.sending -= 1;
                s.delivered += usize::from(delivered);
                drop(s);
                outbox.cv.notify_all();
            }
            Work::Progress(items) if items.is_empty() => {}
            Work::Progress(items) => match (Instant::now(), client.progress(&items)) {
                (sent, Ok(())) => {
                    link.up(sent);
                    backoff.reset();
                }
                (_, Err(ApiError::Status { .. })) if items.len() > 1 => {
                    // Find the job(s) the server does not know, one request each.
                    for p in items {
                        if let Err(ApiError::Status { .. }) =
                            client.progress(std::slice::from_ref(&p))
                        {
                            tracing::warn!(job = %p.job_id, "the API server refuses progress for this job; sending only its result");
                            muted.insert(p.job_id);
                        }
                    }
                }
                (_, Err(ApiError::Status { .. })) => {
                    tracing::warn!(job = %items[0].job_id, "the API server refuses progress for this job; sending only its result");
                    muted.insert(items[0].job_id.clone());
                }
                (_, Err(e)) => {
                    // Dropped, not queued: the next progress carries the newer text anyway.
                    if e.is_unreachable() {
                        link.down(&e);
                    } else {
                        tracing::warn!("progress: {e}");
                    }
                    nap(backoff.delay(), &never);
                }
            },
        }
    }
}
