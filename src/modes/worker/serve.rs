//! The generation loop of one worker: jobs join the running batch at the next step, progress is
//! throttled per job, results go to the outbox, SIGTERM drains.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::job::{job_id, parse_job};
use super::protocol::{Client, JobResult, Progress};
use super::threads::{run_outbox, Inbox, Link, Outbox, Poller};
use crate::engine::{Engine, Event, FinishReason};

/// How the loop paces itself.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_batch: usize,
    /// Least time between two progress records of one job (1 / --progress-rate).
    pub progress_interval: Duration,
    /// Most time without progress for a running job (the server lapses silent jobs).
    pub heartbeat: Duration,
    /// After SIGTERM, running jobs get this long before they are aborted.
    pub grace: Duration,
    /// The server's long poll, from the login.
    pub request_timeout: Duration,
}

/// What a finished worker did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub jobs: usize,
    pub failed: usize,
    pub generated_tokens: usize,
}

struct Running {
    job_id: String,
    /// Concatenated text deltas: what the progress records carry.
    text: String,
    tokens: usize,
    prompt_len: usize,
    sent_tokens: usize,
    sent_at: Instant,
}

/// Serve jobs until `term` is set (then drain) or the server refuses the worker.
pub fn serve(
    engine: &mut Engine,
    client: Arc<Client>,
    settings: &Settings,
    term: Arc<AtomicBool>,
) -> Result<Summary> {
    let link = Arc::new(Link::new(client.url()));
    link.up(Instant::now());
    let outstanding = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let poller = Poller {
        client: client.clone(),
        link: link.clone(),
        outstanding: outstanding.clone(),
        max_batch: settings.max_batch,
        stop: stop.clone(),
        tx,
        request_timeout: settings.request_timeout,
        busy_timeout: Duration::from_secs(2),
    };
    std::thread::Builder::new()
        .name("herd-poller".into())
        .spawn(move || poller.run())?;
    let outbox = Arc::new(Outbox::default());
    {
        let (o, c, l) = (outbox.clone(), client.clone(), link.clone());
        std::thread::Builder::new()
            .name("herd-outbox".into())
            .spawn(move || run_outbox(o, c, l))?;
    }
    let max_len = engine.max_len();
    let tok = engine.tokenizer().clone();
    let mut jobs: HashMap<u64, Running> = HashMap::new();
    let mut summary = Summary::default();
    let mut deadline: Option<Instant> = None;
    let mut poller_done = false;
    let mut fatal: Option<String> = None;
    let answer = |summary: &mut Summary, r: JobResult| {
        summary.jobs += 1;
        summary.failed += usize::from(r.error.is_some());
        summary.generated_tokens += r.num_generated_tokens;
        outbox.result(r);
        outstanding.fetch_sub(1, Ordering::SeqCst);
    };
    loop {
        // New jobs: block briefly only when there is nothing to generate.
        loop {
            let msg = if engine.has_unfinished() || poller_done {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        poller_done = true;
                        break;
                    }
                }
            } else {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        poller_done = true;
                        break;
                    }
                }
            };
            match msg {
                Inbox::Fatal(msg) => fatal = Some(msg),
                Inbox::Jobs(list) => {
                    for v in list {
                        match parse_job(&v, &tok, max_len) {
                            Ok(job) => {
                                if job.trimmed_turns > 0 {
                                    tracing::info!(job = %job.job_id, dropped = job.trimmed_turns, "chat trimmed to fit the context");
                                }
                                let prompt_len = job.prompt.len();
                                match engine.add_request(job.prompt, job.params) {
                                    Ok(id) => {
                                        tracing::debug!(job = %job.job_id, prompt_len, "job started");
                                        jobs.insert(
                                            id,
                                            Running {
                                                job_id: job.job_id,
                                                text: String::new(),
                                                tokens: 0,
                                                prompt_len,
                                                sent_tokens: 0,
                                                sent_at: Instant::now(),
                                            },
                                        );
                                    }
                                    Err(e) => {
                                        tracing::warn!(job = %job.job_id, "job refused: {e}");
                                        answer(
                                            &mut summary,
                                            error_result(job.job_id, e.to_string(), max_len),
                                        );
                                    }
                                }
                            }
                            Err(e) => match e.job_id.or_else(|| job_id(&v)) {
                                Some(id) => {
                                    tracing::warn!(job = %id, "malformed job: {}", e.msg);
                                    answer(&mut summary, error_result(id, e.msg, max_len));
                                }
                                None => {
                                    // Nothing to answer; the server lapses it.
                                    tracing::warn!("a job without a job_id, ignored: {}", e.msg);
                                    outstanding.fetch_sub(1, Ordering::SeqCst);
                                }
                            },
                        }
                    }
                }
            }
        }
        if fatal.is_some() && deadline.is_none() {
            // Refused by the server: nothing more will be accepted; drain at once.
            deadline = Some(Instant::now());
        }
        if deadline.is_none() && term.load(Ordering::SeqCst) {
            tracing::info!(
                running = jobs.len(),
                grace_s = settings.grace.as_secs_f64(),
                "stop signal: taking no more jobs, finishing the running ones"
            );
            deadline = Some(Instant::now() + settings.grace);
        }
        if let Some(dl) = deadline {
            stop.store(true, Ordering::SeqCst);
            if Instant::now() >= dl && !jobs.is_empty() {
                tracing::warn!(
                    jobs = jobs.len(),
                    "grace period over: aborting the running jobs"
                );
                let ids: Vec<u64> = jobs.keys().copied().collect();
                for id in ids {
                    let out = engine.abort(id);
                    if let Some(r) = jobs.remove(&id) {
                        let tokens = out.as_ref().map_or(r.tokens, |o| o.token_ids.len());
                        answer(
                            &mut summary,
                            JobResult {
                                job_id: r.job_id,
                                text: r.text,
                                num_generated_tokens: tokens,
                                prompt_length: r.prompt_len,
                                max_seq_len: max_len,
                                error: Some("the worker shut down before the job finished".into()),
                            },
                        );
                    }
                }
            }
            if jobs.is_empty() && !engine.has_unfinished() {
                break;
            }
        }
        if engine.has_unfinished() {
            for ev in engine.step()? {
                match ev {
                    Event::Token { id, text, .. } => {
                        if let Some(r) = jobs.get_mut(&id) {
                            r.text.push_str(&text);
                            r.tokens += 1;
                        }
                    }
                    Event::Finished(out) => {
                        let Some(r) = jobs.remove(&out.id) else {
                            continue;
                        };
                        if !out.text.starts_with(&r.text) {
                            // Cannot happen without stop strings; the server's stream would break.
                            tracing::error!(job = %r.job_id, "final text does not extend the progress text");
                        }
                        answer(
                            &mut summary,
                            JobResult {
                                job_id: r.job_id,
                                text: out.text,
                                num_generated_tokens: out.token_ids.len(),
                                prompt_length: out.prompt_tokens,
                                max_seq_len: max_len,
                                error: (out.finish_reason == FinishReason::Abort)
                                    .then(|| "aborted".to_string()),
                            },
                        );
                        // A worker runs for days: the prefix cache's hit rate now and then.
                        if summary.jobs % 100 == 0 {
                            log_prefix_cache(engine);
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        for r in jobs.values_mut() {
            let since = now.duration_since(r.sent_at);
            let fresh = r.tokens > r.sent_tokens && since >= settings.progress_interval;
            if fresh || since >= settings.heartbeat {
                outbox.progress(Progress {
                    job_id: r.job_id.clone(),
                    text: r.text.clone(),
                    num_generated_tokens: r.tokens,
                    current_context_length: r.prompt_len + r.tokens,
                });
                r.sent_tokens = r.tokens;
                r.sent_at = now;
            }
        }
    }
    outbox.close(Instant::now() + Duration::from_secs(10));
    let (drained, delivered) = outbox.wait_drained(Instant::now() + Duration::from_secs(15));
    if !drained {
        tracing::error!(
            "some results could not be delivered before exiting ({delivered} delivered)"
        );
    }
    if let Some(msg) = fatal {
        bail!("{msg} (check --api-auth-key / HERD_API_AUTH_KEY and --job-type / HERD_JOB_TYPE)");
    }
    Ok(summary)
}

/// The share of prompt tokens the prefix cache served so far (info).
pub fn log_prefix_cache(engine: &Engine) {
    let st = engine.stats();
    tracing::info!(
        computed = st.prefill_tokens,
        from_cache = st.cached_prompt_tokens,
        "prefix cache served {:.1}% of prompt tokens",
        100.0 * st.prefix_hit_rate()
    );
}

fn error_result(job_id: String, msg: String, max_len: usize) -> JobResult {
    JobResult {
        job_id,
        text: String::new(),
        num_generated_tokens: 0,
        prompt_length: 0,
        max_seq_len: max_len,
        error: Some(msg),
    }
}
