//! `herd worker` against a local AIME-protocol server (loopback only, random port) that speaks the
//! 0.9.x bodies and enforces the real server's pitfalls: no `max_job_batch` → 500, progress for an
//! unknown job → 500, a second result → 500. Every wait is bounded; the worker is killed on drop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const KEY: &str = "test-key-1234";

#[derive(Default)]
struct State {
    queue: VecDeque<Value>,
    /// Job ids ever handed out, and those answered.
    assigned: HashSet<String>,
    done: HashSet<String>,
    /// Progress records per job, in arrival order.
    progress: HashMap<String, Vec<Value>>,
    /// Results in arrival order.
    results: Vec<Value>,
    /// `max_job_batch` of every job request, and the size of every job reply.
    max_job_batch: Vec<u64>,
    batches: Vec<usize>,
    logins: usize,
    /// Protocol violations the real server would answer with 500.
    violations: Vec<String>,
}

struct Server {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
    down: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
    }
}

/// The long poll of this server (short, so that tests and shutdowns are quick).
const REQUEST_TIMEOUT_S: f64 = 1.0;

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().unwrap().port();
        let server = Server {
            port,
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
            down: Arc::new(AtomicBool::new(false)),
            quit: Arc::new(AtomicBool::new(false)),
        };
        let (state, down, quit) = (
            server.state.clone(),
            server.down.clone(),
            server.quit.clone(),
        );
        std::thread::spawn(move || accept_loop(Some(listener), port, state, down, quit));
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn push(&self, job: Value) {
        lock(&self.state.0).queue.push_back(job);
        self.state.1.notify_all();
    }

    fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&lock(&self.state.0))
    }

    /// Wait (at most `secs`) until `cond` holds.
    fn wait(&self, secs: f64, what: &str, cond: impl Fn(&State) -> bool) {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut s = lock(&self.state.0);
        while !cond(&s) {
            let now = Instant::now();
            assert!(now < end, "timed out waiting for {what}");
            s = self
                .state
                .1
                .wait_timeout(s, (end - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn result(&self, job: &str) -> Value {
        self.with(|s| {
            s.results
                .iter()
                .find(|r| r["job_id"] == job)
                .cloned()
                .unwrap_or_else(|| panic!("no result for {job}"))
        })
    }
}

/// Accepts connections; while `down`, the port is closed (connections are refused) and open
/// long polls are cut, as when the server process is gone.
fn accept_loop(
    mut listener: Option<TcpListener>,
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
    down: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
) {
    if let Some(l) = &listener {
        l.set_nonblocking(true).unwrap();
    }
    let end = Instant::now() + Duration::from_secs(120);
    while !quit.load(Ordering::SeqCst) && Instant::now() < end {
        if down.load(Ordering::SeqCst) {
            listener = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if listener.is_none() {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => {
                    l.set_nonblocking(true).unwrap();
                    listener = Some(l);
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some(l) = &listener else { continue };
        match l.accept() {
            Ok((stream, _)) => {
                let (state, down) = (state.clone(), down.clone());
                std::thread::spawn(move || handle(stream, state, down));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn read_request(stream: &mut TcpStream) -> Option<(String, Value)> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head
        .split_whitespace()
        .nth(1)?
        .trim_start_matches('/')
        .to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + len]).ok()?;
    Some((path, body))
}

fn respond(mut stream: TcpStream, status: u16, body: &Value) {
    let text = body.to_string();
    let reason = if status == 200 {
        "OK"
    } else {
        "Internal Server Error"
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

fn handle(mut stream: TcpStream, state: Arc<(Mutex<State>, Condvar)>, down: Arc<AtomicBool>) {
    let Some((path, body)) = read_request(&mut stream) else {
        return;
    };
    let (m, cv) = &*state;
    let key_ok = |v: &Value| v["auth_key"] == KEY;
    let (status, reply) = match path.as_str() {
        "worker_check_server_status" => {
            if key_ok(&body) {
                (200, json!({"cmd": "ok"}))
            } else {
                (
                    200,
                    json!({"cmd": "error", "msg": "Worker not authorized."}),
                )
            }
        }
        "worker_login" => {
            let wp = &body["worker_parameters"];
            let mut s = lock(m);
            for k in [
                "auth",
                "job_type",
                "auth_key",
                "interface_version",
                "version",
                "gpu_name",
                "num_gpus",
                "framework",
                "framework_version",
                "max_batch_size",
            ] {
                if wp.get(k).is_none() {
                    s.violations
                        .push(format!("login without worker_parameters.{k}"));
                }
            }
            for k in [
                "label",
                "quantization",
                "size",
                "family",
                "type",
                "repo_name",
            ] {
                if body["model_parameters"].get(k).is_none() {
                    s.violations
                        .push(format!("login without model_parameters.{k}"));
                }
            }
            if key_ok(wp) {
                s.logins += 1;
                cv.notify_all();
                (
                    200,
                    json!({"success": true, "request_timeout": REQUEST_TIMEOUT_S, "api_server_version": "0.9.6"}),
                )
            } else {
                (
                    200,
                    json!({"success": false, "error_msg": "Worker not authorized: wrong auth_key"}),
                )
            }
        }
        "worker_job_request" => {
            let Some(max) = body.get("max_job_batch").and_then(Value::as_u64) else {
                let mut s = lock(m);
                s.violations
                    .push("job request without max_job_batch".into());
                s.queue.pop_front(); // what 0.9.6 does: the job is lost
                return respond(stream, 500, &json!({}));
            };
            if !key_ok(&body) {
                return respond(
                    stream,
                    200,
                    &json!({"cmd": "error", "msg": "Worker not authorized."}),
                );
            }
            let wait = body["request_timeout"]
                .as_f64()
                .unwrap_or(REQUEST_TIMEOUT_S)
                .min(REQUEST_TIMEOUT_S);
            let end = Instant::now() + Duration::from_secs_f64(wait);
            let mut s = lock(m);
            s.max_job_batch.push(max);
            loop {
                if down.load(Ordering::SeqCst) {
                    return; // the server died: the connection drops without an answer
                }
                if !s.queue.is_empty() {
                    let n = s.queue.len().min(max as usize);
                    let jobs: Vec<Value> = s.queue.drain(..n).collect();
                    for j in &jobs {
                        if let Some(id) = j["job_id"].as_str() {
                            s.assigned.insert(id.to_string());
                        }
                    }
                    s.batches.push(n);
                    cv.notify_all();
                    break (
                        200,
                        json!({"cmd": "job", "job_data": jobs, "start_time": 1.0}),
                    );
                }
                let now = Instant::now();
                if now >= end {
                    break (200, json!({"cmd": "no_job"}));
                }
                s = cv
                    .wait_timeout(s, (end - now).min(Duration::from_millis(20)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        "worker_job_progress" => {
            let mut s = lock(m);
            let items = body.as_array().cloned().unwrap_or_default();
            let unknown: Vec<String> = items
                .iter()
                .filter_map(|p| p["job_id"].as_str())
                .filter(|id| !s.assigned.contains(*id))
                .map(str::to_string)
                .collect();
            if !unknown.is_empty() || items.is_empty() {
                s.violations
                    .push(format!("progress for unknown jobs {unknown:?}"));
                drop(s);
                return respond(stream, 500, &json!({}));
            }
            for p in items {
                let id = p["job_id"].as_str().unwrap_or_default().to_string();
                if p["progress_data"]["text"].as_str().is_none() || p["auth_key"] != KEY {
                    s.violations.push(format!("malformed progress {p}"));
                }
                // Progress after the result is ignored.
                if !s.done.contains(&id) {
                    s.progress.entry(id).or_default().push(p);
                }
            }
            cv.notify_all();
            (200, json!([{"success": true}]))
        }
        "worker_job_result" => {
            let mut s = lock(m);
            let id = body["job_id"].as_str().unwrap_or_default().to_string();
            if s.done.contains(&id) {
                s.violations.push(format!("second result for {id}"));
                drop(s);
                return respond(stream, 500, &json!({}));
            }
            if !s.assigned.contains(&id) {
                (200, json!({"cmd": "warning", "msg": "job unknown"}))
            } else {
                for k in [
                    "text",
                    "num_generated_tokens",
                    "model_name",
                    "max_seq_len",
                    "current_context_length",
                    "prompt_length",
                    "metrics",
                    "version",
                    "auth",
                    "job_type",
                    "auth_key",
                ] {
                    if body.get(k).is_none() {
                        s.violations.push(format!("result without {k}"));
                    }
                }
                s.done.insert(id);
                s.results.push(body);
                cv.notify_all();
                (200, json!({"cmd": "ok"}))
            }
        }
        other => (404, json!({"error": format!("no route {other}")})),
    };
    respond(stream, status, &reply);
}

/// The worker process, killed if a test fails before it exits.
struct Worker {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(url: &str, key: &str, extra: &[&str]) -> Worker {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
        c.arg("worker");
        if !extra.contains(&"--connect-timeout") {
            c.args(["--connect-timeout", "2"]);
        }
        c.args(["--model", "random:tiny"])
            .args(["--progress-rate", "1000"])
            .args(extra)
            .env("HERD_API_SERVER", url)
            .env("HERD_API_AUTH_KEY", key)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap());
        Worker {
            child: c.spawn().expect("herd runs"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Exit code, waiting at most `secs`.
    fn wait(&mut self, secs: u64) -> i32 {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < end,
                "worker did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

fn chat_job(id: &str, max_gen_tokens: u64) -> Value {
    json!({
        "job_id": id,
        "chat_context": [{"role": "system", "content": "You are Dave."}],
        "prompt_input": format!("Tell me about {id}"),
        "top_k": 40, "top_p": 0.9, "temperature": 0.0,
        "max_gen_tokens": max_gen_tokens,
        "start_time": 1.0,
    })
}

fn tokens(v: &Value) -> u64 {
    v["num_generated_tokens"].as_u64().unwrap_or(0)
}

/// Progress texts of a job are cumulative (each extends the one before) and prefixes of the
/// final text; token counts never go back.
fn check_progress(server: &Server, job: &str) -> usize {
    let result = server.result(job);
    let fin = result["text"].as_str().unwrap().to_string();
    server.with(|s| {
        let ps = s.progress.get(job).cloned().unwrap_or_default();
        let mut prev = String::new();
        let mut prev_n = 0;
        for p in &ps {
            let text = p["progress_data"]["text"].as_str().unwrap().to_string();
            let n = p["progress"].as_u64().unwrap();
            assert!(
                text.starts_with(&prev),
                "{job}: progress text not cumulative"
            );
            assert!(
                fin.starts_with(&text),
                "{job}: progress text not a prefix of the result"
            );
            assert!(n >= prev_n && n <= tokens(&result));
            assert_eq!(p["progress_data"]["num_generated_tokens"].as_u64(), Some(n));
            prev = text;
            prev_n = n;
        }
        ps.len()
    })
}

#[test]
fn jobs_aggregate_up_to_the_batch_size_with_per_job_limits_and_cumulative_progress() {
    let server = Server::start();
    let limits = [3u64, 40, 7, 60, 12, 25];
    for (i, n) in limits.iter().enumerate() {
        server.push(chat_job(&format!("j{i}"), *n));
    }
    let mut w = Worker::start(&server.url(), KEY, &["--max-batch-size", "4"]);
    server.wait(30.0, "6 results", |s| s.results.len() == 6);
    let (batches, maxes, violations) = server.with(|s| {
        (
            s.batches.clone(),
            s.max_job_batch.clone(),
            s.violations.clone(),
        )
    });
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(
        batches[0], 4,
        "the first reply fills the whole batch: {batches:?}"
    );
    assert!(maxes.iter().all(|&m| (1..=4).contains(&m)), "{maxes:?}");
    let mut with_progress = 0;
    for (i, n) in limits.iter().enumerate() {
        let id = format!("j{i}");
        let r = server.result(&id);
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(tokens(&r), *n, "{id}: max_gen_tokens honoured exactly");
        assert_eq!(r["metrics"]["out_num_tokens"].as_u64(), Some(*n));
        assert_eq!(
            r["current_context_length"].as_u64(),
            Some(r["prompt_length"].as_u64().unwrap() + n)
        );
        if check_progress(&server, &id) > 0 {
            with_progress += 1;
        }
    }
    assert!(with_progress >= 2, "long jobs get progress records");
    w.sigterm();
    assert_eq!(w.wait(20), 0, "{}", w.log());
    let log = w.log();
    assert!(log.contains("#0_1xCPU"), "worker name in the log: {log}");
}

#[test]
fn a_job_arriving_mid_generation_starts_before_the_running_one_finishes() {
    let server = Server::start();
    server.push(chat_job("long", 300));
    let _w = Worker::start(&server.url(), KEY, &["--max-batch-size", "8"]);
    server.wait(30.0, "long to be generating", |s| {
        s.progress
            .get("long")
            .and_then(|p| p.last())
            .is_some_and(|p| p["progress"].as_u64().unwrap_or(0) >= 5)
    });
    server.push(chat_job("short", 4));
    server.wait(30.0, "both results", |s| s.results.len() == 2);
    let order: Vec<String> = server.with(|s| {
        s.results
            .iter()
            .map(|r| r["job_id"].as_str().unwrap().to_string())
            .collect()
    });
    assert_eq!(order, ["short", "long"], "short joined the running batch");
    assert_eq!(tokens(&server.result("long")), 300);
    assert_eq!(tokens(&server.result("short")), 4);
    check_progress(&server, "long");
    assert!(server.with(|s| s.violations.is_empty()));
}

#[test]
fn a_malformed_job_gets_an_error_result_while_the_others_complete() {
    let server = Server::start();
    server.push(chat_job("good1", 8));
    server.push(json!({"job_id": "bad_context", "chat_context": 5, "max_gen_tokens": 5}));
    server.push(json!({"job_id": "bad_temp", "prompt_input": "hi", "temperature": "hot"}));
    server.push(json!({"job_id": "text", "text_context": "Once upon a time", "max_gen_tokens": 6, "temperature": 0.0}));
    server.push(json!({"job_id": "as_string", "chat_context": "[{\"role\": \"user\", \"content\": \"hi\"}]", "max_gen_tokens": 5}));
    server.push(chat_job("good2", 9));
    let _w = Worker::start(&server.url(), KEY, &["--max-batch-size", "16"]);
    server.wait(30.0, "6 results", |s| s.results.len() == 6);
    for bad in ["bad_context", "bad_temp"] {
        let r = server.result(bad);
        let e = r["error"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(!e.is_empty());
        assert_eq!(tokens(&r), 0);
    }
    assert!(server.result("bad_temp")["error"]
        .as_str()
        .unwrap()
        .contains("temperature"));
    for (good, n) in [("good1", 8), ("good2", 9), ("text", 6), ("as_string", 5)] {
        let r = server.result(good);
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(tokens(&r), n);
    }
    assert!(server.with(|s| s.violations.is_empty()));
}

/// Structured outputs in AIME jobs: the batch fields, when a job has them (tests/structured.rs
/// covers the constraints themselves); a bad one is that job's error, the others complete.
#[test]
fn jobs_with_structured_output_fields_are_constrained() {
    let server = Server::start();
    server.push(
        json!({"job_id": "re", "text_context": "Code:", "temperature": 1.0, "seed": 2,
        "max_gen_tokens": 50, "guided_regex": "[A-Z]{3}[0-9]{2}"}),
    );
    server.push(
        json!({"job_id": "pick", "prompt_input": "Pick", "temperature": 1.0,
        "max_gen_tokens": 50, "structured_outputs": {"choice": ["left", "right"]}}),
    );
    server.push(json!({"job_id": "bad", "prompt_input": "x", "guided_regex": "("}));
    let _w = Worker::start(&server.url(), KEY, &["--max-batch-size", "4"]);
    server.wait(30.0, "3 results", |s| s.results.len() == 3);
    let text = |id: &str| {
        server.result(id)["text"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let re = text("re");
    assert!(
        re.len() == 5
            && re[..3].bytes().all(|b| b.is_ascii_uppercase())
            && re[3..].bytes().all(|b| b.is_ascii_digit()),
        "{re}"
    );
    assert!(
        ["left", "right"].contains(&text("pick").as_str()),
        "{}",
        text("pick")
    );
    let bad = server.result("bad");
    let e = bad["error"].as_str().unwrap_or_else(|| panic!("{bad}"));
    assert!(e.contains("guided_regex: "), "{e}");
}

#[test]
fn the_worker_reconnects_after_the_server_goes_away_and_finishes_its_jobs() {
    let server = Server::start();
    server.push(chat_job("a", 250));
    server.push(chat_job("b", 250));
    let mut w = Worker::start(&server.url(), KEY, &["--max-batch-size", "4"]);
    server.wait(30.0, "generation under way", |s| {
        s.progress.get("a").is_some_and(|p| !p.is_empty())
    });
    server.down.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2500));
    server.down.store(false, Ordering::SeqCst);
    // A job queued while the worker was cut off is taken after the reconnect.
    server.push(chat_job("c", 5));
    server.wait(40.0, "3 results", |s| s.results.len() == 3);
    for (id, n) in [("a", 250), ("b", 250), ("c", 5)] {
        let r = server.result(id);
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(tokens(&r), n);
    }
    check_progress(&server, "a");
    let (logins, violations) = server.with(|s| (s.logins, s.violations.clone()));
    assert!(logins >= 2, "logged in again after the outage");
    assert!(violations.is_empty(), "{violations:?}");
    w.sigterm();
    assert_eq!(w.wait(20), 0);
    let log = w.log();
    assert!(log.contains("reachable again"), "{log}");
    assert_eq!(
        log.matches("retrying with backoff").count(),
        1,
        "one log line per state change: {log}"
    );
}

#[test]
fn a_wrong_key_is_a_clean_nonzero_exit_with_the_servers_message() {
    let server = Server::start();
    server.push(chat_job("never", 5));
    let mut w = Worker::start(&server.url(), "wrong-key", &[]);
    let code = w.wait(20);
    let log = w.log();
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("Worker not authorized"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(server.with(|s| s.queue.len()), 1, "no job taken");
}

/// A port that was free a moment ago: nothing listens there.
fn unreachable_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[test]
fn an_unreachable_server_is_named_and_the_worker_gives_up() {
    let url = unreachable_url();
    let t0 = Instant::now();
    let mut w = Worker::start(&url, KEY, &["--connect-timeout", "1"]);
    let code = w.wait(20);
    let log = w.log();
    assert_eq!(code, 1, "{log}");
    assert!(log.contains(&url) && log.contains("unreachable"), "{log}");
    assert!(t0.elapsed() < Duration::from_secs(15));
}

#[test]
fn sigterm_while_waiting_for_the_server_ends_the_wait_at_once() {
    let url = unreachable_url();
    let mut w = Worker::start(&url, KEY, &["--connect-timeout", "600"]);
    let t0 = Instant::now();
    while !w.log().contains("retrying") {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", w.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    w.sigterm();
    let t1 = Instant::now();
    let code = w.wait(10);
    let log = w.log();
    assert_eq!(code, 4, "{log}");
    assert!(log.contains("stop signal while waiting"), "{log}");
    assert!(t1.elapsed() < Duration::from_secs(3), "{log}");
}

#[test]
fn sigterm_stops_taking_jobs_and_drains_the_running_ones() {
    let server = Server::start();
    server.push(chat_job("r1", 150));
    server.push(chat_job("r2", 150));
    let mut w = Worker::start(&server.url(), KEY, &["--max-batch-size", "2"]);
    server.wait(30.0, "generation under way", |s| {
        s.progress.get("r1").is_some_and(|p| !p.is_empty())
    });
    w.sigterm();
    std::thread::sleep(Duration::from_millis(200));
    server.push(chat_job("late", 5));
    assert_eq!(w.wait(30), 0, "{}", w.log());
    for id in ["r1", "r2"] {
        let r = server.result(id);
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(tokens(&r), 150, "finished, not cut");
    }
    let (queued, violations) = server.with(|s| (s.queue.len(), s.violations.clone()));
    assert_eq!(queued, 1, "no job taken after SIGTERM");
    assert!(violations.is_empty(), "{violations:?}");
}

#[test]
fn sigterm_aborts_what_the_grace_period_cannot_finish_and_still_answers() {
    let server = Server::start();
    server.push(chat_job("huge", 5000));
    let mut w = Worker::start(
        &server.url(),
        KEY,
        &["--max-batch-size", "1", "--shutdown-grace", "0.5"],
    );
    server.wait(30.0, "generation under way", |s| {
        s.progress.get("huge").is_some_and(|p| !p.is_empty())
    });
    w.sigterm();
    assert_eq!(w.wait(30), 0, "{}", w.log());
    let r = server.result("huge");
    assert!(r["error"].as_str().unwrap().contains("shut down"), "{r}");
    assert!(tokens(&r) > 0 && tokens(&r) < 5000);
    check_progress(&server, "huge");
}

/// Throughput of 32 concurrent chat jobs, continuous batching (--max-batch-size 32) versus one
/// at a time. By hand, against a release binary:
/// `cargo build --release && HERD_BIN=target/release/herd cargo test --test worker -- --ignored --nocapture`
/// (appends to results/worker-cpu.csv).
#[test]
#[ignore]
fn measure_32_chat_jobs_batched_versus_one_at_a_time() {
    let bin = std::env::var("HERD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_herd").into());
    let profile = if bin.contains("release") {
        "release"
    } else {
        "dev"
    };
    let machine = herd::modes::host::cpu_name();
    let (n_jobs, max_gen) = (32, 64u64);
    let mut rows = Vec::new();
    for batch in [32usize, 1] {
        let server = Server::start();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&bin)
            .args(["worker", "--model", "random:tiny", "--progress-rate", "5"])
            .args(["--max-batch-size", &batch.to_string()])
            .env("HERD_API_SERVER", server.url())
            .env("HERD_API_AUTH_KEY", KEY)
            .env("RAYON_NUM_THREADS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("herd runs");
        let mut w = Worker { child, log };
        server.wait(60.0, "login", |s| s.logins >= 1);
        let t0 = Instant::now();
        for i in 0..n_jobs {
            server.push(json!({
                "job_id": format!("m{i}"),
                "chat_context": [{"role": "system", "content": "You are Dave, a helpful assistant."}],
                "prompt_input": format!("Question number {i}: what is the capital of France?"),
                "top_k": 40, "top_p": 0.9, "temperature": 0.8,
                "max_gen_tokens": max_gen,
            }));
        }
        server.wait(300.0, "all results", |s| s.results.len() == n_jobs);
        let secs = t0.elapsed().as_secs_f64();
        let toks: u64 = server.with(|s| s.results.iter().map(tokens).sum());
        w.sigterm();
        assert_eq!(w.wait(30), 0);
        let row = format!(
            "{machine},2,random:tiny,{profile},{n_jobs},{max_gen},{batch},{secs:.2},{:.2},{:.1}",
            n_jobs as f64 / secs,
            toks as f64 / secs
        );
        println!("{row}");
        rows.push(row);
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/worker-cpu.csv");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    if new {
        writeln!(
            f,
            "machine,threads,model,profile,jobs,max_gen_tokens,max_batch_size,seconds,jobs_per_s,tokens_per_s"
        )
        .unwrap();
    }
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}
