//! Malformed checkpoint, config and tokenizer files (issue 11, point 16): a damaged file ends in
//! an error that names it, or (when the damage is harmless) in a load that works; never in a
//! panic, a hang or an allocation sized by a header.
//!
//! The cases damage copies of the real small files in tests/fixtures and of the real Llama 3
//! tokenizer (truncation, flipped bytes, zip fields and pickle operands set to huge or odd values,
//! JSON values replaced, bombs inserted) and load them the way herd does: a model directory
//! through `open_model` and `Llama::load` on the CPU backend (whole, and as rank 1 of tp 2), every
//! tensor it lists, and `herd convert`; a tokenizer through `Tokenizer::from_file`, then encode
//! and decode. Layouts: Meta (single, MP 2, AIME merged), HF (single, sharded with index, tied),
//! herd's per-rank layout. tests/fixtures/malformed/ keeps the findings as files.
//!
//! Each test runs its cases in a child process (this test binary again, see [`guarded`]) under an
//! address-space limit, so an allocation sized by a header aborts the child and fails the test
//! naming the case; the parent kills a child whose case runs past a wall-clock bound (a hang); the
//! child checks each case's peak-RSS growth and catches panics. The cases come from fixed seeds,
//! so CI runs the same ones every time (about 3000 cases, 10-20 s on 2 cores). Locally:
//!   HERD_FUZZ_CASES=N   cases per damaged base (default: CI's count for each)
//!   HERD_FUZZ_SEED=S    another seed
//!   HERD_FUZZ_ONLY=TEXT only the cases whose label contains TEXT (reproduces one finding)
//!   HERD_FUZZ_SAVE=DIR  keep each failing case's damaged file in DIR

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::fixture;
use herd::backend::cpu::CpuBackend;
use herd::model::llama::Llama;
use herd::model::loader::open_model;
use herd::model::shard::ShardPlan;
use herd::modes::convert::{self, ConvertArgs, Format};
use herd::tokenizer::{Message, Role, Tokenizer};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The harness: a child process per test, with limits.

/// Set in the child to the name of the test it runs.
const CHILD_ENV: &str = "HERD_MALFORMED_CHILD";
/// Set in the child to the index of the first case to run (the ones before were run already).
const FROM_ENV: &str = "HERD_MALFORMED_FROM";
/// Set in the child to the wall-clock bound of one case.
const SECONDS_ENV: &str = "HERD_MALFORMED_CASE_SECONDS";
/// Address space of the child: the loads here need well under 1 GiB; a header-sized allocation
/// (a "1 TB tensor") fails and aborts the child.
const ADDRESS_SPACE_MB: u64 = 1024;
/// Peak-RSS growth allowed for one case.
const CASE_RSS_MB: u64 = 400;
/// A case still running after this long is a hang.
const CASE_SECONDS: u64 = 60;
/// Longest error message that still reads as a clear error (a file's contents must not be echoed).
const MAX_ERROR_LEN: usize = 2000;

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn cases_or(default: usize) -> usize {
    env_usize("HERD_FUZZ_CASES").unwrap_or(default)
}

fn base_seed() -> u64 {
    std::env::var("HERD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1116)
}

/// Runs `body` in a child process (this binary, only test `test`) with an address-space limit,
/// watching for hangs, and fails with every problem the child reports.
fn guarded(test: &str, body: fn(&mut Cases)) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        let mut cases = Cases::new();
        body(&mut cases);
        cases.finish();
        return;
    }
    let (fails, summaries) = supervise(test, CASE_SECONDS);
    assert!(
        fails.is_empty(),
        "{test}: {} case(s) failed:\n{}",
        fails.len(),
        fails.join("\n")
    );
    eprintln!("{test}: {}", summaries.join("; then "));
}

/// Runs the children of `test`: a child that dies (an allocation past the limit aborts it) or
/// hangs is counted against its current case, and a new child resumes after that case, so one
/// run reports every finding. Returns the failures and the children's summaries.
fn supervise(test: &str, case_seconds: u64) -> (Vec<String>, Vec<String>) {
    let mut fails = Vec::new();
    let mut summaries = Vec::new();
    let mut from = 0;
    loop {
        let run = run_child(test, from, case_seconds);
        fails.extend(run.fails);
        summaries.extend(run.summary);
        match run.died {
            None => break,
            Some((index, why)) => {
                fails.push(why);
                from = index + 1;
            }
        }
        assert!(
            fails.len() < 100,
            "{test}: too many failures:\n{}",
            fails.join("\n")
        );
    }
    (fails, summaries)
}

/// What one child process reported.
struct ChildRun {
    fails: Vec<String>,
    summary: Option<String>,
    /// The index of the case it died or hung in, and how.
    died: Option<(usize, String)>,
}

/// Runs the child from case `from` on, until it exits or a case runs past `case_seconds`.
fn run_child(test: &str, from: usize, case_seconds: u64) -> ChildRun {
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v "$1" || exit 97; shift; exec "$@""#)
        .arg("sh")
        .arg((ADDRESS_SPACE_MB * 1024).to_string())
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .env(FROM_ENV, from.to_string())
        .env(SECONDS_ENV, case_seconds.to_string())
        // glibc reserves 64 MB of address space per thread arena: keep it predictable
        .env("MALLOC_ARENA_MAX", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child test process");
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = BufReader::new(err).read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    // (index, label) of the case running now
    let mut current: Option<(usize, String)> = None;
    // Timeouts in a row while no case runs
    let mut quiet = 0;
    let mut run = ChildRun {
        fails: Vec::new(),
        summary: None,
        died: None,
    };
    loop {
        match rx.recv_timeout(Duration::from_secs(case_seconds)) {
            Ok(line) => {
                quiet = 0;
                // libtest may print "test NAME ... " before the child's first line
                let Some(at) = line.find("@@") else { continue };
                let line = &line[at..];
                if let Some(l) = line.strip_prefix("@@start ") {
                    let (i, label) = l.split_once(' ').unwrap_or((l, ""));
                    current = i.parse().ok().map(|i| (i, label.to_string()));
                } else if line.starts_with("@@end") {
                    current = None;
                } else if let Some(f) = line.strip_prefix("@@fail ") {
                    run.fails.push(f.to_string());
                } else if let Some(s) = line.strip_prefix("@@summary ") {
                    run.summary = Some(s.to_string());
                }
            }
            // Between cases the child only prepares the next one: give it longer.
            Err(mpsc::RecvTimeoutError::Timeout) if current.is_none() && quiet < 4 => quiet += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                let Some((i, label)) = current else {
                    panic!(
                        "{test}: the child is silent for {quiet} x {case_seconds} s between cases"
                    );
                };
                run.died = Some((
                    i,
                    format!("[{label}] still runs after {case_seconds} s: a hang"),
                ));
                return run;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().expect("wait for the child");
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        return run;
    }
    let tail: String = stderr.lines().rev().take(6).collect::<Vec<_>>().join(" / ");
    match current {
        Some((i, label)) => {
            run.died = Some((
                i,
                format!(
                    "[{label}] killed the process ({status}; an allocation past the \
                     {ADDRESS_SPACE_MB} MB address-space limit aborts it): {}",
                    one_line(&tail, 600)
                ),
            ))
        }
        // Outside a case: the test's own setup failed, or the child reported failures.
        None if run.fails.is_empty() => panic!("{test}: the child failed ({status}):\n{stderr}"),
        None => {}
    }
    run
}

/// Peak RSS in kB, after asking the kernel to reset it (so it measures one case).
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    peak_rss()
}

fn peak_rss() -> Option<u64> {
    status_kb("VmHWM:")
}

/// A kB figure from /proc/self/status.
fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with(key))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

fn one_line(s: &str, max: usize) -> String {
    let s: String = s.chars().take(max).collect();
    s.escape_debug().to_string()
}

/// How one case ended.
#[derive(Default)]
struct Outcome {
    /// False when HERD_FUZZ_ONLY left the case out.
    ran: bool,
    /// The load's error, if it failed (cleanly or not).
    error: Option<String>,
    /// The case broke a rule (panic, unclear error, memory, time).
    failed: bool,
}

/// With HERD_FUZZ_SAVE=DIR, every damaged file is written there before its case runs and removed
/// when the case passes: what is left are the findings (even a case that aborted the process).
fn save_finding(label: &str, file: &str, bytes: &[u8]) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("HERD_FUZZ_SAVE")?);
    std::fs::create_dir_all(&dir).ok()?;
    let tag: String = label
        .split(':')
        .next()
        .unwrap_or(label)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '#' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let p = dir.join(format!("{tag}__{file}"));
    std::fs::write(&p, bytes).ok()?;
    Some(p)
}

fn keep_if_failed(saved: Option<PathBuf>, outcome: &Outcome) {
    if let Some(p) = saved.filter(|_| !outcome.failed) {
        let _ = std::fs::remove_file(p);
    }
}

/// The cases of one test, run in the child.
struct Cases {
    only: Option<String>,
    /// Cases before this index were run by an earlier child.
    from: usize,
    /// Index of the next case.
    next: usize,
    /// The wall-clock bound of one case (the parent kills the child at it; half is too slow).
    seconds: u64,
    run: usize,
    errors: usize,
    slowest: (Duration, String),
    peak: (u64, String),
}

impl Cases {
    fn new() -> Cases {
        Cases {
            only: std::env::var("HERD_FUZZ_ONLY")
                .ok()
                .filter(|s| !s.is_empty()),
            from: env_usize(FROM_ENV).unwrap_or(0),
            next: 0,
            seconds: env_usize(SECONDS_ENV).map_or(CASE_SECONDS, |s| s as u64),
            run: 0,
            errors: 0,
            slowest: (Duration::ZERO, String::new()),
            peak: (0, String::new()),
        }
    }

    /// Runs one case. `names` are what an error must mention (the damaged file's name; any one
    /// of them will do).
    fn case(
        &mut self,
        label: &str,
        names: &[&str],
        load: impl FnOnce() -> Result<(), String>,
    ) -> Outcome {
        let index = self.next;
        self.next += 1;
        if index < self.from
            || self
                .only
                .as_ref()
                .is_some_and(|o| !label.contains(o.as_str()))
        {
            return Outcome::default();
        }
        println!("@@start {index} {label}");
        let _ = std::io::stdout().flush();
        // Without clear_refs (some sandboxes) the peak only grows: growth past it still counts.
        let before = reset_peak_rss().or_else(peak_rss);
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(load));
        let took = t0.elapsed();
        let growth = before
            .zip(peak_rss())
            .map_or(0, |(b, a)| a.saturating_sub(b));
        self.run += 1;
        let mut problem = None;
        let mut error = None;
        match result {
            Err(p) => problem = Some(format!("panicked: {}", panic_text(p.as_ref()))),
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.errors += 1;
                let unnamed =
                    |p: &&str| !p.starts_with(CONVERT) && !names.iter().any(|n| p.contains(n));
                if let Some(part) = e.split(AND).find(unnamed) {
                    problem = Some(format!("an error names none of {names:?}: {part}"));
                } else if e.split(AND).any(|p| p.len() > MAX_ERROR_LEN) {
                    problem = Some(format!("an error of {} bytes: {e}", e.len()));
                }
                error = Some(e);
            }
        }
        if growth > CASE_RSS_MB * 1024 {
            problem.get_or_insert(format!(
                "peak RSS grew by {} MB (limit {CASE_RSS_MB} MB)",
                growth / 1024
            ));
        }
        if took > Duration::from_secs(self.seconds / 2) {
            problem.get_or_insert(format!("took {:.1} s", took.as_secs_f64()));
        }
        if took > self.slowest.0 {
            self.slowest = (took, label.to_string());
        }
        if growth > self.peak.0 {
            self.peak = (growth, label.to_string());
        }
        let failed = problem.is_some();
        if let Some(p) = problem {
            println!("@@fail [{label}] {}", one_line(&p, 1500));
        }
        println!("@@end");
        Outcome {
            ran: true,
            error,
            failed,
        }
    }

    /// A case whose file is broken beyond use: it must end in a clear error.
    fn must_fail(
        &mut self,
        label: &str,
        names: &[&str],
        load: impl FnOnce() -> Result<(), String>,
    ) {
        let o = self.case(label, names, load);
        if o.ran && !o.failed && o.error.is_none() {
            println!("@@fail [{label}] loaded, but the file is broken: it must be refused");
        }
    }

    /// A broken file that must end in an error naming it and saying `expect`.
    fn must_fail_with(
        &mut self,
        label: &str,
        names: &[&str],
        expect: &str,
        load: impl FnOnce() -> Result<(), String>,
    ) {
        let o = self.case(label, names, load);
        match o.error {
            _ if !o.ran || o.failed => {}
            None => println!("@@fail [{label}] loaded, but the file is broken: it must be refused"),
            Some(e) if !e.contains(expect) => {
                println!(
                    "@@fail [{label}] the error does not say {expect:?}: {}",
                    one_line(&e, 1000)
                )
            }
            Some(_) => {}
        }
    }

    fn finish(self) {
        println!(
            "@@summary {} cases ({} errors, the rest loaded); slowest {:.2} s [{}]; largest \
             peak-RSS growth {} MB [{}]; address space used {} of {ADDRESS_SPACE_MB} MB",
            self.run,
            self.errors,
            self.slowest.0.as_secs_f64(),
            self.slowest.1,
            self.peak.0 / 1024,
            self.peak.1,
            status_kb("VmPeak:").unwrap_or(0) / 1024,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: what herd does with a user's files.

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let m = x.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = x.source();
    }
    s
}

/// Joins the errors of several entry points into one case result; each must name the file.
const AND: &str = "\n  and then: ";
/// Marks an error of `herd convert`: it need not name the damaged file (convert reads tensors
/// before comparing them with the config, so it may refuse a damaged config by a tensor's name,
/// or refuse a conversion it cannot write), but must be as short and must not panic.
const CONVERT: &str = "herd convert: ";

/// Opens a model directory as herd does and loads it on the CPU backend (whole and as rank 1 of
/// tp 2), reads every tensor it lists, and converts it (`herd convert --tp 2`, both formats, which
/// reads tensors without checking them against the config first).
fn load_model_dir(dir: &Path) -> Result<(), String> {
    let spec = dir.to_str().ok_or("temp path is UTF-8")?;
    let src = open_model(spec).map_err(|e| chain(&e))?;
    let loaded = (|| {
        for plan in [ShardPlan::SOLO, ShardPlan { rank: 1, tp: 2 }] {
            if ShardPlan::check(plan.tp, &src.cfg).is_err() {
                continue;
            }
            Llama::load(
                CpuBackend::default(),
                src.tensors.as_ref(),
                &src.cfg,
                plan,
                2,
                16,
            )
            .map_err(|e| chain(&e))?;
        }
        for name in src.tensors.names() {
            src.tensors.shape(&name).map_err(|e| chain(&e))?;
            let t = src.tensors.load(&name, None).map_err(|e| chain(&e))?;
            // Touch the last element, as a backend would.
            if t.numel() > 0 {
                let _ = t.get_f32(t.numel() - 1);
            }
        }
        if let Some(tok) = &src.tokenizer {
            load_tokenizer(tok)?;
        }
        Ok(())
    })();
    let mut errors: Vec<String> = loaded.err().into_iter().collect();
    // Meta output needs a Meta source (an HF config need not round-trip) and whole KV heads.
    let meta_ok = dir.join("params.json").exists() && src.cfg.n_kv_heads >= 2;
    if ShardPlan::check(2, &src.cfg).is_ok() {
        for format in [Format::Safetensors, Format::Meta] {
            if format == Format::Meta && !meta_ok {
                continue;
            }
            let out = tempfile::tempdir().map_err(|e| e.to_string())?;
            let args = ConvertArgs {
                model: dir.to_path_buf(),
                output: out.path().join("out"),
                tp: 2,
                format,
            };
            if let Err(e) = convert::run(args) {
                errors.push(format!("{CONVERT}{e:#}"));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join(AND))
    }
}

const SAMPLE: &str = "Hello, world! 1234567 \n\n\t  ünïcödé 日本語 🦀 <|eot_id|> \u{0}\u{1c} \
                      'll 've   trailing   ";

/// Loads a tokenizer file and uses it: encode, chat format, decode every id.
fn load_tokenizer(path: &Path) -> Result<(), String> {
    let t = Tokenizer::from_file(path).map_err(|e| chain(&e))?;
    let mut text = String::from(SAMPLE);
    text.extend((1u8..128).map(char::from));
    let ids = t.encode(&text, true, true);
    let _ = t.decode(&ids);
    let dialog = [
        Message::new(Role::System, "be brief"),
        Message::new(Role::User, SAMPLE),
    ];
    let _ = t.decode(&t.encode_dialog(&dialog));
    let every: Vec<u32> = (0..t.vocab_size() as u32 + 2).collect();
    let _ = t.decode(&every);
    let _ = t.try_decode_bytes(&every);
    let _ = t.stop_ids();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness and damage.

/// SplitMix64: small, deterministic, good enough to pick damage.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: &str, i: usize) -> Rng {
        let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in stream.bytes().chain((i as u64).to_le_bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    /// True with probability `p` percent.
    fn pct(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// Values that break size and offset arithmetic.
const ODD_U64: &[u64] = &[
    0,
    1,
    2,
    7,
    255,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 53,
    1 << 60,
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

fn odd_u64(rng: &mut Rng, near: u64) -> u64 {
    match rng.below(4) {
        0 => near.wrapping_add(1),
        1 => near.wrapping_sub(1),
        2 => near.wrapping_mul(2),
        _ => rng.pick(ODD_U64),
    }
}

fn truncate(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    let n = match rng.below(4) {
        0 => rng.below(64.min(b.len())),
        1 => b.len() - 1 - rng.below(512.min(b.len())),
        _ => rng.below(b.len()),
    };
    b.truncate(n);
    format!("truncated to {n} bytes")
}

/// Flips or sets 1-4 bytes in `range`.
fn flip(rng: &mut Rng, b: &mut [u8], range: std::ops::Range<usize>) -> String {
    let mut at = Vec::new();
    if range.is_empty() {
        return "nothing to flip".into();
    }
    for _ in 0..1 + rng.below(4) {
        let i = range.start + rng.below(range.len());
        b[i] = match rng.below(3) {
            0 => b[i] ^ (1 << rng.below(8)),
            1 => rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'\n', b'"', b'{', b']']),
            _ => rng.next() as u8,
        };
        at.push(i);
    }
    format!("bytes {at:?} changed")
}

fn put_le(b: &mut [u8], at: usize, width: usize, v: u64) {
    for k in 0..width {
        if at + k < b.len() {
            b[at + k] = (v >> (8 * k)) as u8;
        }
    }
}

fn get_le(b: &[u8], at: usize, width: usize) -> u64 {
    (0..width)
        .filter(|k| at + k < b.len())
        .map(|k| (b[at + k] as u64) << (8 * k))
        .sum()
}

// --- zip records ---

/// A zip record's signature and its numeric fields (offset, width).
type ZipRecord = (&'static [u8; 4], &'static [(usize, usize)]);

/// The zip records of a torch.save file.
const ZIP_RECORDS: &[ZipRecord] = &[
    // local file header: flags, method, crc, sizes, name and extra lengths
    (
        b"PK\x03\x04",
        &[(6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    ),
    // central directory header: method, sizes, lengths, disk, local header offset
    (
        b"PK\x01\x02",
        &[
            (10, 2),
            (20, 4),
            (24, 4),
            (28, 2),
            (30, 2),
            (32, 2),
            (34, 2),
            (42, 4),
        ],
    ),
    // end of central directory: disks, entry counts, directory size and offset, comment length
    (
        b"PK\x05\x06",
        &[(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
    ),
    // zip64 end of central directory
    (
        b"PK\x06\x06",
        &[(4, 8), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8)],
    ),
    // zip64 locator
    (b"PK\x06\x07", &[(4, 4), (8, 8), (16, 4)]),
    // zip64 extended information extra field (sizes, offset)
    (b"\x01\x00\x18\x00", &[(2, 2), (4, 8), (12, 8), (20, 8)]),
];

fn zip_records(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..b.len().saturating_sub(4) {
        for (k, (sig, _)) in ZIP_RECORDS.iter().enumerate() {
            if &b[i..i + 4] == *sig {
                out.push((i, k));
            }
        }
    }
    out
}

/// Sets one numeric field of one zip record to an odd value.
fn zip_field(rng: &mut Rng, b: &mut [u8]) -> String {
    let recs = zip_records(b);
    if recs.is_empty() {
        return "no zip record".into();
    }
    let (at, k) = rng.pick(&recs);
    let (sig, fields) = ZIP_RECORDS[k];
    let (off, width) = rng.pick(fields);
    let old = get_le(b, at + off, width);
    let mut v = odd_u64(rng, old);
    if rng.pct(30) {
        v = b.len() as u64 + rng.below(3) as u64 - 1;
    }
    put_le(b, at + off, width, v);
    format!(
        "zip record {:?} at {at}: field +{off} ({width} bytes) {old} -> {}",
        String::from_utf8_lossy(&sig[2..]),
        get_le(b, at + off, width)
    )
}

// --- pickle ---

/// Opcode boundaries of a pickle: (start, end) of every instruction, up to STOP or the first
/// opcode this walker does not know.
fn pickle_ops(p: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let op = p[i];
        let len = |at: usize, w: usize| get_le(p, at, w) as usize;
        let n = match op {
            0x80 | b'K' | b'q' | b'h' => 2,
            b'M' => 3,
            b'J' | b'r' | b'j' => 5,
            b'G' | 0x95 => 9,
            b'U' | b'C' | 0x8c | 0x8a => 2 + len(i + 1, 1),
            b'T' | b'B' | b'X' => 5 + len(i + 1, 4),
            0x8d => 9 + len(i + 1, 8),
            b'c' => {
                let nl = |from: usize| {
                    p[from..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map(|x| from + x + 1)
                };
                match nl(i + 1).and_then(nl) {
                    Some(e) => e - i,
                    None => break,
                }
            }
            b'.' | b'(' | b'}' | b']' | b')' | b'N' | 0x88 | 0x89 | 0x85 | 0x86 | 0x87 | 0x93
            | 0x94 | b't' | b'l' | b'a' | b'e' | b'd' | b's' | b'u' | b'Q' | b'R' | b'b' | b'0'
            | b'2' => 1,
            _ => break,
        };
        let end = (i + n).min(p.len());
        out.push((i, end));
        if op == b'.' {
            break;
        }
        i = end;
    }
    out
}

fn pickle_int(v: i64) -> Vec<u8> {
    match i32::try_from(v) {
        Ok(x) => [vec![b'J'], x.to_le_bytes().to_vec()].concat(),
        Err(_) => [vec![0x8a, 8], v.to_le_bytes().to_vec()].concat(),
    }
}

const ODD_I64: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    0xffff,
    i32::MAX as i64,
    i32::MIN as i64,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 53,
    1 << 62,
    i64::MAX,
    i64::MIN,
    -(1 << 40),
];

/// Kinds of [`pickle_bomb`].
const BOMBS: usize = 8;

/// A pickle fragment of `n` steps that, if a reader does not bound it, costs memory or time
/// without end: returned with its name.
fn pickle_bomb(kind: usize, n: usize) -> (Vec<u8>, &'static str) {
    match kind {
        // deep nesting: [[[[...]]]]
        0 => ([vec![b']'; n], vec![b'a'; n - 1]].concat(), "nested lists"),
        // deep tuples: ((((...))))
        1 => ([b")".to_vec(), vec![0x85; n]].concat(), "nested tuples"),
        // marks without end
        2 => (vec![b'('; n], "open marks"),
        // a list doubled by DUP + APPEND: l = [l', l'', ...]
        3 => (
            [b"]".to_vec(), b"2a".repeat(n)].concat(),
            "DUP/APPEND doubling",
        ),
        // a list memoized then fetched over and over
        4 => (
            [
                b"](".to_vec(),
                b"K\x00".repeat(n),
                b"eq\x00".to_vec(),
                b"h\x00".repeat(n),
            ]
            .concat(),
            "memo copies of a list",
        ),
        // a big list memoized over and over
        5 => (
            [
                b"](".to_vec(),
                b"K\x00".repeat(n),
                b"e".to_vec(),
                vec![0x94; n],
            ]
            .concat(),
            "MEMOIZE of a big list",
        ),
        // one big string copied through the memo
        6 => {
            let s = vec![b'a'; 1 << 20];
            (
                [
                    vec![b'X'],
                    (s.len() as u32).to_le_bytes().to_vec(),
                    s,
                    b"q\x00".to_vec(),
                    b"h\x00".repeat(n.min(100_000)),
                ]
                .concat(),
                "memo copies of a 1 MB string",
            )
        }
        // a dict that keeps growing under its own copies
        _ => (
            [b"}".to_vec(), b"2K\x00s".repeat(n)].concat(),
            "DUP/SETITEM doubling",
        ),
    }
}

/// Damages a pickle at the opcode level.
fn mutate_pickle(rng: &mut Rng, p: &mut Vec<u8>) -> String {
    let ops = pickle_ops(p);
    if ops.is_empty() {
        return "no pickle ops".into();
    }
    let (s, e) = rng.pick(&ops);
    let op = p[s];
    match rng.below(9) {
        // an integer (size, stride, offset, numel) set to an odd value
        0 | 1 => {
            let ints: Vec<(usize, usize)> = ops
                .iter()
                .copied()
                .filter(|&(s, _)| matches!(p[s], b'K' | b'M' | b'J' | 0x8a))
                .collect();
            if ints.is_empty() {
                return "no ints".into();
            }
            let (s, e) = rng.pick(&ints);
            let v = rng.pick(ODD_I64);
            p.splice(s..e, pickle_int(v));
            format!("pickle int at {s} -> {v}")
        }
        // a length operand set to an odd value, the bytes left as they are
        2 => {
            let lens: Vec<usize> = ops
                .iter()
                .map(|&(s, _)| s)
                .filter(|&s| matches!(p[s], b'X' | b'T' | b'B' | 0x8c | b'U' | b'C' | 0x8a))
                .collect();
            if lens.is_empty() {
                return "no lengths".into();
            }
            let s = rng.pick(&lens);
            let w = if matches!(p[s], b'X' | b'T' | b'B') {
                4
            } else {
                1
            };
            let old = get_le(p, s + 1, w);
            put_le(p, s + 1, w, odd_u64(rng, old));
            format!("pickle length at {s}: {old} -> {}", get_le(p, s + 1, w))
        }
        3 => {
            p.drain(s..e);
            format!("pickle op 0x{op:02x} at {s} deleted")
        }
        4 => {
            let ins = p[s..e].to_vec();
            p.splice(s..s, ins);
            format!("pickle op 0x{op:02x} at {s} doubled")
        }
        5 => {
            let n = rng.pick(&[1000, 100_000, 1_000_000]);
            let (bomb, what) = pickle_bomb(rng.below(BOMBS), n);
            p.splice(s..s, bomb);
            format!("pickle bomb at {s}: {what}")
        }
        6 => {
            let g: &[u8] = rng.pick(&[
                &b"cos\nsystem\n"[..],
                b"ctorch\nLongStorage\n",
                b"ctorch\nDoubleStorage\n",
                b"ctorch._utils\n_rebuild_parameter\n",
                b"ccollections\nOrderedDict\n",
                b"c\n\n",
                b"ctorch\n\xff\n",
            ]);
            p.splice(s..e, g.iter().copied());
            format!(
                "pickle op at {s} -> {}",
                String::from_utf8_lossy(g).escape_debug()
            )
        }
        7 => {
            let b = rng.pick(&[
                0x00u8, 0xff, b'R', b'Q', b'b', b'.', b'(', b't', b'u', b's', 0x93,
            ]);
            p.insert(s, b);
            format!("pickle byte 0x{b:02x} inserted at {s}")
        }
        _ => {
            let n = p.len();
            flip(rng, p, 0..n)
        }
    }
}

// --- torch.save files ---

/// The entries of a torch.save zip, in order.
fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("fixture zip");
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).expect("fixture entry");
            let mut data = Vec::new();
            f.read_to_end(&mut data).expect("fixture entry data");
            (f.name().to_string(), data)
        })
        .collect()
}

/// Writes entries as torch does (stored, 64-byte aligned), with or without zip64 records.
fn write_zip(entries: &[(String, Vec<u8>)], zip64: bool) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(zip64)
        .with_alignment(64);
    for (name, data) in entries {
        z.start_file(name.as_str(), opts).expect("zip entry");
        z.write_all(data).expect("zip data");
    }
    z.finish().expect("zip end").into_inner()
}

fn pkl_index(entries: &[(String, Vec<u8>)]) -> usize {
    entries
        .iter()
        .position(|(n, _)| n.ends_with("/data.pkl"))
        .expect("a data.pkl entry")
}

fn mutate_pth(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    match rng.below(20) {
        0..=2 => truncate(rng, b),
        3..=5 => {
            // bytes of the zip structure or of the pickle (tensor data damage is harmless)
            let recs = zip_records(b);
            let at = if recs.is_empty() {
                0
            } else {
                rng.pick(&recs).0
            };
            let end = (at + 64).min(b.len());
            let what = flip(rng, b, at..end);
            format!("near zip record at {at}: {what}")
        }
        6..=10 => zip_field(rng, b),
        _ => {
            let mut entries = zip_entries(b);
            let k = pkl_index(&entries);
            let what = if rng.pct(10) {
                // an entry dropped or renamed
                let j = rng.below(entries.len());
                if rng.pct(50) {
                    let n = entries.remove(j).0;
                    format!("entry {n} removed")
                } else {
                    let old = entries[j].0.clone();
                    entries[j].0 = format!("{old}x");
                    format!("entry {old} renamed")
                }
            } else {
                mutate_pickle(rng, &mut entries[k].1)
            };
            *b = write_zip(&entries, rng.pct(50));
            what
        }
    }
}

// --- JSON ---

fn deep_array(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

fn odd_json(rng: &mut Rng) -> Value {
    match rng.below(24) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1u64 << 31),
        3 => json!(1u64 << 32),
        4 => json!(1u64 << 40),
        5 => json!(1u64 << 60),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!(1e300),
        9 => json!(0.5),
        10 => json!(""),
        11 => json!("F64"),
        12 => Value::Null,
        13 => json!(true),
        14 => json!([]),
        15 => json!({}),
        16 => json!([1u64 << 40, 1u64 << 40]),
        17 => json!([0, u64::MAX]),
        18 => deep_array(rng.pick(&[20, 100, 1000])),
        19 => Value::String("x".repeat(rng.pick(&[100_000, 3_000_000]))),
        20 => Value::Array(vec![json!(1); rng.pick(&[100, 100_000])]),
        21 => json!(3),
        22 => json!(-1e300),
        _ => json!("BF16"),
    }
}

/// Replaces, removes or multiplies one value somewhere in `v`.
fn mutate_json(rng: &mut Rng, v: &mut Value, path: &mut String) -> String {
    let descend = rng.pct(75);
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[rng.below(keys.len())].clone();
            path.push('.');
            path.push_str(&k);
            if descend {
                return mutate_json(rng, m.get_mut(&k).expect("key"), path);
            }
            match rng.below(3) {
                0 => {
                    m.remove(&k);
                    format!("{path} removed")
                }
                1 => {
                    let x = m.remove(&k).expect("key");
                    m.insert(format!("{k}_"), x);
                    format!("{path} renamed")
                }
                _ => {
                    *m.get_mut(&k).expect("key") = odd_json(rng);
                    format!("{path} = {}", one_line(&m[&k].to_string(), 60))
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            path.push_str(&format!("[{i}]"));
            if descend {
                return mutate_json(rng, &mut a[i], path);
            }
            if rng.pct(50) {
                a.remove(i);
                format!("{path} removed")
            } else {
                let x = a[i].clone();
                a.push(x);
                format!("{path} repeated")
            }
        }
        _ => {
            *v = odd_json(rng);
            format!("{path} = {}", one_line(&v.to_string(), 60))
        }
    }
}

/// Damages a JSON file: as text (truncation, bytes) or as a value.
fn mutate_json_file(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    match rng.below(10) {
        0 => truncate(rng, b),
        1 => {
            let n = b.len();
            flip(rng, b, 0..n)
        }
        _ => {
            let mut v: Value = serde_json::from_slice(b).expect("fixture JSON");
            let what = mutate_json(rng, &mut v, &mut String::new());
            *b = serde_json::to_vec(&v).expect("JSON out");
            what
        }
    }
}

// --- safetensors ---

fn split_safetensors(b: &[u8]) -> (Value, Vec<u8>) {
    let n = get_le(b, 0, 8) as usize;
    let header = serde_json::from_slice(&b[8..8 + n]).expect("fixture header");
    (header, b[8 + n..].to_vec())
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).expect("header out");
    [(h.len() as u64).to_le_bytes().to_vec(), h, data.to_vec()].concat()
}

fn mutate_safetensors(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    let n = get_le(b, 0, 8) as usize;
    match rng.below(10) {
        0 => truncate(rng, b),
        1 => {
            let v = match rng.below(3) {
                0 => b.len() as u64 - 8 + rng.below(3) as u64,
                1 => n as u64 + rng.below(3) as u64 - 1,
                _ => rng.pick(ODD_U64),
            };
            put_le(b, 0, 8, v);
            format!("header length {n} -> {v}")
        }
        2 => flip(rng, b, 8..8 + n),
        _ => {
            let (mut h, data) = split_safetensors(b);
            let what = mutate_json(rng, &mut h, &mut String::new());
            *b = join_safetensors(&h, &data);
            what
        }
    }
}

// --- tokenizer.model ---

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn mutate_tiktoken(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    let mut lines: Vec<Vec<u8>> = b.split(|&c| c == b'\n').map(|l| l.to_vec()).collect();
    let i = rng.below(lines.len().saturating_sub(1).max(1));
    let what = match rng.below(12) {
        0 => return truncate(rng, b),
        1 => {
            let n = b.len();
            return flip(rng, b, 0..n);
        }
        2 => {
            lines.remove(i);
            format!("line {} removed", i + 1)
        }
        3 => {
            let l = lines[i].clone();
            lines.insert(i, l);
            format!("line {} doubled", i + 1)
        }
        4 => {
            let j = rng.below(lines.len());
            lines.swap(i, j);
            format!("lines {} and {} swapped", i + 1, j + 1)
        }
        5 => {
            let tok = lines[i]
                .split(|&c| c == b' ')
                .next()
                .unwrap_or(b"")
                .to_vec();
            let rank = rng.pick(&[
                "4294967295",
                "4294967296",
                "-1",
                "x",
                "",
                "1e3",
                "99999999999999999999",
                "0",
                "128000",
            ]);
            lines[i] = [tok, b" ".to_vec(), rank.as_bytes().to_vec()].concat();
            format!("line {} rank -> {rank:?}", i + 1)
        }
        6 => {
            let rank = lines[i]
                .split(|&c| c == b' ')
                .nth(1)
                .unwrap_or(b"0")
                .to_vec();
            let tok = match rng.below(5) {
                0 => "!!!!".to_string(),
                1 => String::new(),
                2 => b64(&vec![b'a'; 100_000]),
                3 => b64(b""),
                _ => b64(&[rng.next() as u8, rng.next() as u8]),
            };
            lines[i] = [tok.into_bytes(), b" ".to_vec(), rank].concat();
            format!("line {} token replaced", i + 1)
        }
        7 => {
            lines.insert(i, vec![b'Q'; rng.pick(&[10_000, 1_000_000, 8_000_000])]);
            format!("a long line at {}", i + 1)
        }
        8 => {
            let l = [lines[i].clone(), b" 7".to_vec()].concat();
            lines[i] = l;
            format!("line {} has 3 fields", i + 1)
        }
        9 => {
            lines.insert(0, b"\xef\xbb\xbf".to_vec());
            "a byte-order mark".into()
        }
        10 => {
            lines[i] = lines[i]
                .iter()
                .map(|&c| if c == b' ' { b'\t' } else { c })
                .collect();
            format!("line {} tab-separated", i + 1)
        }
        _ => {
            lines.truncate(i.max(1));
            format!("only {} lines kept", i.max(1))
        }
    };
    *b = lines.join(&b'\n');
    what
}

// ---------------------------------------------------------------------------------------------
// Bases: real small files to damage.

/// A directory's files, read once.
struct DirBase {
    name: String,
    files: Vec<(String, Vec<u8>)>,
}

impl DirBase {
    fn read(rel: &str) -> DirBase {
        DirBase::read_path(&fixture(rel), rel)
    }

    /// herd's per-rank layout, written by `herd convert --tp 2` from the fixture `rel`.
    fn converted(rel: &str) -> DirBase {
        let out = tempfile::tempdir().expect("tempdir");
        let dir = out.path().join("tp2");
        let args = ConvertArgs {
            model: fixture(rel),
            output: dir.clone(),
            tp: 2,
            format: Format::Safetensors,
        };
        convert::run(args).unwrap_or_else(|e| panic!("herd convert {rel}: {e:#}"));
        DirBase::read_path(&dir, &format!("{rel} converted to tp 2"))
    }

    fn read_path(dir: &Path, name: &str) -> DirBase {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let e = e.expect("dir entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).expect("fixture file"))
            })
            .collect();
        files.sort();
        DirBase {
            name: name.to_string(),
            files,
        }
    }

    /// AIME's merged layout: consolidated.NN.pth renamed merged.<n>GPUs.NN.pth.
    fn into_merged(mut self) -> DirBase {
        let n = self.files.iter().filter(|f| f.0.ends_with(".pth")).count();
        for (name, _) in &mut self.files {
            if let Some(k) = name.strip_prefix("consolidated.") {
                *name = format!("merged.{n}GPUs.{k}");
            }
        }
        self.name += " as merged";
        self
    }

    /// Replaces (or adds) one file.
    fn with_file(mut self, name: &str, bytes: &[u8]) -> DirBase {
        self.files.retain(|f| f.0 != name);
        self.files.push((name.to_string(), bytes.to_vec()));
        self.files.sort();
        self
    }

    fn write(&self, dir: &Path, replace: Option<(usize, &[u8])>) {
        for (i, (name, bytes)) in self.files.iter().enumerate() {
            let b = match replace {
                Some((k, r)) if k == i => r,
                _ => bytes,
            };
            std::fs::write(dir.join(name), b).expect("write case file");
        }
    }
}

/// pth/meta2 (two MP shards, made for the reader's tests), with the params its FFN width (24)
/// needs to load as a model.
fn meta2() -> DirBase {
    DirBase::read("pth/meta2").with_file(
        "params.json",
        br#"{"dim": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 10,
            "multiple_of": 8, "ffn_dim_multiplier": 0.5, "norm_eps": 1e-05}"#,
    )
}

fn damage(rng: &mut Rng, name: &str, b: &mut Vec<u8>) -> String {
    if name.ends_with(".pth") {
        mutate_pth(rng, b)
    } else if name.ends_with(".safetensors") {
        mutate_safetensors(rng, b)
    } else if name.ends_with(".json") {
        mutate_json_file(rng, b)
    } else {
        mutate_tiktoken(rng, b)
    }
}

/// What an error about damage to `file` may name: the file, or (config damage) the comparison of
/// the weights with the config, which names the checkpoint's files and the first tensor that
/// differs or is missing.
fn names_for(file: &str) -> Vec<&str> {
    if file == "params.json" || file == "config.json" {
        // More layers than the checkpoint has: the first one missing is named.
        vec![
            file,
            "the model config needs",
            "is missing from the checkpoint",
        ]
    } else {
        vec![file]
    }
}

/// `n` cases of damage to one file of `base`, loaded as a model directory.
fn fuzz_dir(c: &mut Cases, base: &DirBase, n: usize) {
    let seed = base_seed();
    // The base itself must load, or the damage proves nothing.
    let clean = tempfile::tempdir().expect("tempdir");
    base.write(clean.path(), None);
    if let Some(e) = c
        .case(&format!("{} undamaged", base.name), &[], || {
            load_model_dir(clean.path())
        })
        .error
    {
        panic!("{} does not load undamaged: {e}", base.name);
    }
    for i in 0..n {
        let mut rng = Rng::new(seed, &base.name, i);
        // Weight the checkpoint files over the small JSON files.
        let weights: Vec<usize> = base
            .files
            .iter()
            .map(|(n, _)| if n.ends_with(".json") { 1 } else { 3 })
            .collect();
        let mut k = rng.below(weights.iter().sum());
        let f = weights
            .iter()
            .position(|&w| {
                let hit = k < w;
                k = k.saturating_sub(w);
                hit
            })
            .unwrap_or(0);
        let (name, orig) = &base.files[f];
        let mut b = orig.clone();
        let what = damage(&mut rng, name, &mut b);
        let dir = tempfile::tempdir().expect("tempdir");
        base.write(dir.path(), Some((f, &b)));
        let label = format!("{}#{i} {name}: {what}", base.name);
        let saved = save_finding(&label, name, &b);
        let outcome = c.case(&label, &names_for(name), || load_model_dir(dir.path()));
        keep_if_failed(saved, &outcome);
    }
}

/// The real Llama 3 tokenizer (tests need it; scripts/fetch-tokenizer puts it in the cache).
fn real_tokenizer() -> Vec<u8> {
    let p = herd::tokenizer::default_tokenizer_path();
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/fetch-tokenizer (the tests use the real Llama 3 tokenizer)",
            p.display()
        )
    })
}

/// The first `n` lines of the real tokenizer.model: a small but real tokenizer (its ranks start
/// with the 256 single bytes).
fn small_tiktoken(n: usize) -> Vec<u8> {
    let full = real_tokenizer();
    let lines: Vec<&[u8]> = full.split(|&c| c == b'\n').take(n).collect();
    [lines.join(&b'\n'), b"\n".to_vec()].concat()
}

/// GPT-2's byte-level alphabet (what tokenizer.json stores tokens in).
fn byte_level(b: u8) -> char {
    let printable = |x: u8| matches!(x, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).expect("below 0x200")
}

/// An HF tokenizer.json with the same vocabulary as `tiktoken` (its merges are plausible
/// pairs: herd ranks by id and ignores them).
fn hf_json_from(tiktoken: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut vocab = serde_json::Map::new();
    let mut merges = Vec::new();
    let mut n = 0u32;
    for line in tiktoken.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        let mut it = line.split(|&c| c == b' ');
        let tok = base64::engine::general_purpose::STANDARD
            .decode(it.next().expect("token"))
            .expect("base64");
        let s: String = tok.iter().map(|&b| byte_level(b)).collect();
        if s.chars().count() > 1 {
            let first: String = s.chars().take(1).collect();
            let rest: String = s.chars().skip(1).collect();
            merges.push(json!(format!("{first} {rest}")));
        }
        vocab.insert(s, json!(n));
        n += 1;
    }
    let added: Vec<Value> = herd::tokenizer::meta_special_tokens(n)
        .into_iter()
        .map(|(s, id)| json!({"id": id, "content": s, "special": true}))
        .collect();
    serde_json::to_vec(&json!({
        "version": "1.0",
        "added_tokens": added,
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }))
    .expect("JSON out")
}

fn fuzz_tokenizer(c: &mut Cases, label: &str, file: &str, base: &[u8], n: usize) {
    let seed = base_seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = dir.path().join(file);
    std::fs::write(&clean, base).expect("write");
    if let Some(e) = c
        .case(&format!("{label} undamaged"), &[], || {
            load_tokenizer(&clean)
        })
        .error
    {
        panic!("{label} does not load undamaged: {e}");
    }
    for i in 0..n {
        let mut rng = Rng::new(seed, label, i);
        let mut b = base.to_vec();
        let what = if file.ends_with(".json") {
            mutate_tokenizer_json(&mut rng, &mut b)
        } else {
            mutate_tiktoken(&mut rng, &mut b)
        };
        let p = dir.path().join(format!("{i}-{file}"));
        std::fs::write(&p, &b).expect("write");
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(file)
            .to_string();
        let label = format!("{label}#{i}: {what}");
        let saved = save_finding(&label, file, &b);
        let outcome = c.case(&label, &[&name], || load_tokenizer(&p));
        keep_if_failed(saved, &outcome);
        let _ = std::fs::remove_file(&p);
    }
}

/// tokenizer.json damage: generic JSON damage, or aimed at ids, added tokens and merges.
fn mutate_tokenizer_json(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    if rng.pct(50) {
        return mutate_json_file(rng, b);
    }
    let mut v: Value = serde_json::from_slice(b).expect("fixture JSON");
    let what = match rng.below(6) {
        0 => {
            let id = rng.pick(&[u32::MAX as u64, 1 << 31, 1 << 24, 128_255, 0, 1 << 32]);
            let k = rng.below(256);
            v["added_tokens"][k]["id"] = json!(id);
            format!("added_tokens[{k}].id = {id}")
        }
        1 => {
            let id = rng.pick(&[u32::MAX as u64, 1 << 31, 1 << 24, 300, 0, 1 << 32]);
            let vocab = v["model"]["vocab"].as_object_mut().expect("vocab");
            let keys: Vec<String> = vocab.keys().cloned().collect();
            let k = keys[rng.below(keys.len())].clone();
            vocab.insert(k.clone(), json!(id));
            format!("model.vocab[{k:?}] = {id}")
        }
        2 => {
            let k = rng.below(256);
            let content = rng.pick(&["", "a", "<|eot_id|>", " ", "\u{0}"]);
            v["added_tokens"][k]["content"] = json!(content);
            format!("added_tokens[{k}].content = {content:?}")
        }
        3 => {
            // absurd merges: many, long, not pairs, not strings
            let m: Vec<Value> = match rng.below(4) {
                0 => (0..200_000).map(|i| json!(format!("x{i} y{i}"))).collect(),
                1 => vec![json!("a".repeat(1_000_000))],
                2 => vec![json!([1, [2, [3]]]), json!(null), json!({"a": 1})],
                _ => vec![deep_array(100)],
            };
            v["model"]["merges"] = Value::Array(m);
            "absurd merges".into()
        }
        4 => {
            let extra: Vec<Value> = (0..rng.pick(&[1000, 50_000]))
                .map(|i| json!({"id": 1_000_000 + i, "content": format!("<|x{i}|>")}))
                .collect();
            v["added_tokens"]
                .as_array_mut()
                .expect("added_tokens")
                .extend(extra);
            "many added tokens".into()
        }
        _ => {
            let t = rng.pick(&["WordPiece", "Unigram", "", "bpe"]);
            v["model"]["type"] = json!(t);
            format!("model.type = {t:?}")
        }
    };
    *b = serde_json::to_vec(&v).expect("JSON out");
    what
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn damaged_meta_checkpoints_fail_cleanly() {
    guarded("damaged_meta_checkpoints_fail_cleanly", |c| {
        fuzz_dir(c, &meta2(), cases_or(500));
        fuzz_dir(c, &meta2().into_merged(), cases_or(120));
        fuzz_dir(c, &DirBase::read("models/llama30/meta"), cases_or(100));
        fuzz_dir(c, &DirBase::read("models/llama31/meta-mp2"), cases_or(60));
    });
}

#[test]
fn damaged_hf_checkpoints_fail_cleanly() {
    guarded("damaged_hf_checkpoints_fail_cleanly", |c| {
        fuzz_dir(c, &DirBase::read("pth/hf"), cases_or(400));
        fuzz_dir(c, &DirBase::read("pth/hf_sharded"), cases_or(400));
        fuzz_dir(c, &DirBase::read("models/llama32tied/hf"), cases_or(100));
        fuzz_dir(c, &DirBase::read("models/llama31/hf"), cases_or(60));
        fuzz_dir(c, &DirBase::converted("pth/hf"), cases_or(250));
    });
}

#[test]
fn damaged_tokenizers_fail_cleanly() {
    guarded("damaged_tokenizers_fail_cleanly", |c| {
        let small = small_tiktoken(1000);
        let json = hf_json_from(&small);
        let full = real_tokenizer();
        // (label, file name, contents, cases): the whole Llama 3 file loads in ~0.3 s, so it
        // gets a hundredth of the cases
        let bases = [
            (
                "tokenizer.model (1000 lines)",
                "tokenizer.model",
                &small,
                cases_or(300),
            ),
            (
                "tokenizer.json (1000 tokens)",
                "tokenizer.json",
                &json,
                cases_or(200),
            ),
            (
                "Llama 3 tokenizer.model",
                "tokenizer.model",
                &full,
                cases_or(600) / 100,
            ),
        ];
        for (label, file, base, n) in bases {
            fuzz_tokenizer(c, label, file, base, n);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Files built to hurt: each declaration the issue names, on purpose rather than by chance.

/// Pickle ops for hand-made state dicts (protocol 2, as torch writes them).
struct Pkl(Vec<u8>);

impl Pkl {
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        self.0.extend(pickle_int(v));
    }
    fn tuple(&mut self, xs: &[i64]) {
        self.0.push(b'(');
        xs.iter().for_each(|&x| self.int(x));
        self.0.push(b't');
    }
}

/// One tensor of a hand-made state dict.
#[derive(Clone)]
struct Spec {
    name: String,
    shape: Vec<i64>,
    stride: Vec<i64>,
    offset: i64,
    /// Storage key and its declared element count.
    key: String,
    numel: i64,
}

impl Spec {
    /// A dense bf16 tensor with its own storage `key`.
    fn dense(name: &str, shape: &[usize], key: usize) -> Spec {
        let mut stride = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1].wrapping_mul(shape[d + 1] as i64);
        }
        Spec {
            name: name.into(),
            shape: shape.iter().map(|&x| x as i64).collect(),
            stride,
            offset: 0,
            key: key.to_string(),
            numel: shape.iter().fold(1usize, |a, &b| a.wrapping_mul(b)) as i64,
        }
    }
}

/// `{name: _rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())}`.
fn state_dict_pickle(specs: &[Spec]) -> Vec<u8> {
    let mut p = Pkl(vec![0x80, 2, b'}', b'(']);
    for t in specs {
        p.str(&t.name);
        p.0.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.0.push(b'(');
        p.str("storage");
        p.0.extend(b"ctorch\nBFloat16Storage\n");
        p.str(&t.key);
        p.str("cpu");
        p.int(t.numel);
        p.0.extend(b"tQ");
        p.int(t.offset);
        p.tuple(&t.shape);
        p.tuple(&t.stride);
        p.0.extend(b"\x89ccollections\nOrderedDict\n)RtR");
    }
    p.0.extend(b"u.");
    p.0
}

/// A torch.save file of `specs`; each storage holds as many bytes as declared, capped at 4 KB
/// (so a declaration larger than that is a lie the reader must catch).
fn pth_bytes(pickle: Vec<u8>, specs: &[Spec]) -> Vec<u8> {
    let mut entries = vec![
        ("archive/data.pkl".to_string(), pickle),
        ("archive/byteorder".to_string(), b"little".to_vec()),
    ];
    let mut keys: Vec<(&str, i64)> = specs.iter().map(|t| (t.key.as_str(), t.numel)).collect();
    keys.sort();
    keys.dedup_by_key(|k| k.0);
    for (key, numel) in keys {
        let n = (numel.clamp(0, 2048) * 2) as usize;
        entries.push((format!("archive/data/{key}"), vec![0x3f; n]));
    }
    entries.push(("archive/version".to_string(), b"3\n".to_vec()));
    write_zip(&entries, false)
}

/// A tiny consistent Meta config: dim 16, 1 layer, 2 heads (2 kv), vocab 8, FFN 24.
const SMALL_PARAMS: &str = r#"{"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2,
    "vocab_size": 8, "multiple_of": 8, "ffn_dim_multiplier": 0.5}"#;

/// Dense specs of every tensor `params` implies (Meta names).
fn specs_for(params: &str) -> Vec<Spec> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("params.json");
    std::fs::write(&p, params).expect("write");
    let cfg = herd::model::LlamaConfig::from_meta_params(&p).expect("a valid config");
    herd::model::llama::tensor_specs(&cfg)
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| Spec::dense(name, shape, i))
        .collect()
}

/// Writes a Meta directory of `shards` (each a list of specs) under `params`.
fn write_meta(dir: &Path, params: &str, shards: &[Vec<Spec>]) {
    std::fs::write(dir.join("params.json"), params).expect("write");
    for (r, specs) in shards.iter().enumerate() {
        let b = pth_bytes(state_dict_pickle(specs), specs);
        std::fs::write(dir.join(format!("consolidated.{r:02}.pth")), b).expect("write");
    }
}

/// A model-directory case: `make` writes the broken directory; it must fail naming `names`.
fn dir_case(c: &mut Cases, label: &str, names: &[&str], make: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().expect("tempdir");
    make(dir.path());
    c.must_fail(label, names, || load_model_dir(dir.path()));
}

/// The fixture directory `rel` with `file` replaced by `edit` of its contents.
fn edited(rel: &str, file: &str, edit: impl FnOnce(&mut Vec<u8>)) -> impl FnOnce(&Path) {
    let base = DirBase::read(rel);
    let file = file.to_string();
    move |dir: &Path| {
        base.write(dir, None);
        let p = dir.join(&file);
        let mut b = std::fs::read(&p).expect("fixture file");
        edit(&mut b);
        std::fs::write(&p, b).expect("write");
    }
}

/// A safetensors header edit on pth/hf's model.safetensors.
fn st_header(edit: impl FnOnce(&mut Value)) -> impl FnOnce(&Path) {
    edited("pth/hf", "model.safetensors", |b| {
        let (mut h, data) = split_safetensors(b);
        edit(&mut h);
        *b = join_safetensors(&h, &data);
    })
}

fn config_edit(rel: &str, file: &str, key: &str, v: Value) -> impl FnOnce(&Path) {
    let key = key.to_string();
    edited(rel, file, move |b| {
        let mut j: Value = serde_json::from_slice(b).expect("fixture JSON");
        j[&key] = v;
        *b = serde_json::to_vec(&j).expect("JSON out");
    })
}

const TB: u64 = 1 << 40;

fn huge_model_files(c: &mut Cases) {
    // safetensors
    let st = |c: &mut Cases, label: &str, make: Box<dyn FnOnce(&Path)>| {
        dir_case(c, label, &["model.safetensors"], make)
    };
    let length = |v: u64| edited("pth/hf", "model.safetensors", move |b| put_le(b, 0, 8, v));
    st(
        c,
        "safetensors header length 2^60",
        Box::new(length(1 << 60)),
    );
    st(
        c,
        "safetensors header length u64::MAX",
        Box::new(length(u64::MAX)),
    );
    let tb_tensor = st_header(|h| {
        h["model.embed_tokens.weight"]["shape"] = json!([1u64 << 20, 1u64 << 19]);
        h["model.embed_tokens.weight"]["data_offsets"] = json!([0, TB]);
    });
    st(c, "safetensors tensor of 1 TB", Box::new(tb_tensor));
    let far = st_header(|h| {
        h["model.norm.weight"]["data_offsets"] = json!([u64::MAX - 32, u64::MAX]);
    });
    st(c, "safetensors offsets near 2^64", Box::new(far));
    let empty = st_header(|h| {
        h["model.norm.weight"]["shape"] = json!([0, TB, TB, TB]);
        h["model.norm.weight"]["data_offsets"] = json!([0, 0]);
    });
    st(
        c,
        "safetensors empty tensor of 2^40 x 2^40 x 2^40",
        Box::new(empty),
    );
    let dims = st_header(|h| {
        h["model.norm.weight"]["shape"] = Value::Array(vec![json!(1); 100_000]);
    });
    st(c, "safetensors shape of 100000 dims", Box::new(dims));
    let dtype = st_header(|h| h["model.norm.weight"]["dtype"] = json!("F".repeat(3 << 20)));
    st(c, "safetensors dtype of 3 MB", Box::new(dtype));
    let string = st_header(|h| *h = json!("x".repeat(3 << 20)));
    st(c, "safetensors header is a 3 MB string", Box::new(string));

    // torch.save: declarations in the pickle
    dir_case(c, "pth storage of 1 TB", &["consolidated.00.pth"], |d| {
        let mut specs = specs_for(SMALL_PARAMS);
        specs[0].numel = TB as i64 / 2;
        write_meta(d, SMALL_PARAMS, &[specs]);
    });
    dir_case(
        c,
        "pth view of 1 TB over a 1-element storage (stride 0), config to match",
        &["consolidated.00.pth"],
        |d| {
            // 2^20 tokens x 2^19 dim: the embedding alone is 1 TB of bf16.
            let params = r#"{"dim": 524288, "n_layers": 1, "n_heads": 4096, "n_kv_heads": 4096,
            "vocab_size": 1048576}"#;
            let specs: Vec<Spec> = specs_for(params)
                .into_iter()
                .map(|mut t| {
                    t.stride = vec![0; t.shape.len()];
                    t.key = "0".into();
                    t.numel = 1;
                    t
                })
                .collect();
            write_meta(d, params, &[specs]);
        },
    );
    dir_case(
        c,
        "pth empty tensor whose dims multiply past 2^64",
        &["consolidated.00.pth"],
        |d| {
            let mut specs = specs_for(SMALL_PARAMS);
            let mut t = Spec::dense("extra.weight", &[1 << 62, 1 << 62, 0], 999);
            t.stride = vec![0, 0, 0];
            specs.push(t);
            write_meta(d, SMALL_PARAMS, &[specs]);
        },
    );
    dir_case(
        c,
        "pth empty tensor at storage offset 2^63",
        &["consolidated.00.pth"],
        |d| {
            let mut specs = specs_for(SMALL_PARAMS);
            let mut t = Spec::dense("extra.weight", &[0], 999);
            t.offset = i64::MAX;
            specs.push(t);
            write_meta(d, SMALL_PARAMS, &[specs]);
        },
    );
    dir_case(
        c,
        "pth empty norm.weight of 2^40 x 2^40 x 2^40",
        &["consolidated.00.pth"],
        |d| {
            let mut specs = specs_for(SMALL_PARAMS);
            let t = specs
                .iter_mut()
                .find(|t| t.name == "norm.weight")
                .expect("norm");
            *t = Spec::dense("norm.weight", &[0, 1 << 40, 1 << 40, 1 << 40], 999);
            write_meta(d, SMALL_PARAMS, &[specs]);
        },
    );
    dir_case(
        c,
        "pth 1-D attention.wo (split along dim 1)",
        &["consolidated.00.pth"],
        |d| {
            let mut specs = specs_for(SMALL_PARAMS);
            let t = specs
                .iter_mut()
                .find(|t| t.name.ends_with("wo.weight"))
                .expect("wo");
            *t = Spec::dense(&t.name.clone(), &[256], 999);
            write_meta(d, SMALL_PARAMS, &[specs]);
        },
    );
    dir_case(
        c,
        "pth shape of 100000 dims",
        &["consolidated.00.pth"],
        |d| {
            let mut specs = specs_for(SMALL_PARAMS);
            specs[0].shape = vec![1; 100_000];
            specs[0].stride = vec![1; 100_000];
            write_meta(d, SMALL_PARAMS, &[specs]);
        },
    );
    dir_case(
        c,
        "pth shards whose sizes along the split dim add past 2^64",
        &["consolidated.0"],
        |d| {
            let specs = specs_for(SMALL_PARAMS);
            let shard = |_r: usize| {
                let mut s = specs.clone();
                let wo = s
                    .iter_mut()
                    .find(|t| t.name.ends_with("attention.wo.weight"))
                    .expect("wo");
                wo.shape = vec![0, i64::MAX];
                wo.stride = vec![0, 0];
                s
            };
            write_meta(d, SMALL_PARAMS, &[shard(0), shard(1), shard(2)]);
        },
    );

    // zip declarations: every numeric field of the first record of each kind, set huge
    let shard = std::fs::read(fixture("pth/meta2/consolidated.00.pth")).expect("fixture");
    for zip64 in [false, true] {
        let b = if zip64 {
            write_zip(&zip_entries(&shard), true)
        } else {
            shard.clone()
        };
        let recs = zip_records(&b);
        let mut seen = Vec::new();
        for (at, k) in recs {
            if seen.contains(&k) {
                continue;
            }
            seen.push(k);
            let (sig, fields) = ZIP_RECORDS[k];
            for &(off, width) in fields {
                let max = if width == 8 {
                    u64::MAX
                } else {
                    (1u64 << (8 * width)) - 1
                };
                for v in [max, max / 2 + 1, 1 << 60, b.len() as u64 + 1] {
                    let v = v.min(max);
                    let label = format!(
                        "zip{} {:?} at {at}: field +{off} = {v}",
                        if zip64 { "64" } else { "" },
                        String::from_utf8_lossy(&sig[2..])
                    );
                    let mut bad = b.clone();
                    put_le(&mut bad, at + off, width, v);
                    // Many fields (a CRC, a date, an unread count) do not matter: either way.
                    let dir = tempfile::tempdir().expect("tempdir");
                    meta2().write(dir.path(), None);
                    std::fs::write(dir.path().join("consolidated.00.pth"), bad).expect("write");
                    c.case(&label, &["consolidated.00.pth"], || {
                        load_model_dir(dir.path())
                    });
                }
            }
        }
    }

    // pickle bombs, each run before anything else in the pickle
    for kind in 0..BOMBS {
        let mut entries = zip_entries(&shard);
        let k = pkl_index(&entries);
        let (bomb, what) = pickle_bomb(kind, 1_000_000);
        entries[k].1.splice(2..2, bomb);
        let bad = write_zip(&entries, false);
        let base = meta2();
        dir_case(
            c,
            &format!("pickle bomb: {what}"),
            &["consolidated.00.pth"],
            move |d| {
                base.write(d, None);
                std::fs::write(d.join("consolidated.00.pth"), bad).expect("write");
            },
        );
    }

    // configs with sizes no checkpoint can back
    let hf_configs = [
        ("num_hidden_layers", json!(TB)),
        ("hidden_size", json!(1u64 << 60)),
        // heads x head_dim past 2^64
        ("head_dim", json!(TB)),
        ("max_position_embeddings", json!(u64::MAX)),
        ("vocab_size", json!("9".repeat(3 << 20))),
        ("model_type", json!("x".repeat(3 << 20))),
        ("rope_scaling", json!({"rope_type": "x".repeat(3 << 20)})),
    ];
    for (key, v) in hf_configs {
        let label = format!("config.json {key} = {}", one_line(&v.to_string(), 24));
        let make = config_edit("pth/hf", "config.json", key, v);
        dir_case(c, &label, &["config.json"], make);
    }
    let meta_params = [
        ("multiple_of", json!(0)),
        ("ffn_dim_multiplier", json!(1e300)),
        ("ffn_dim_multiplier", json!(u64::MAX)),
        ("dim", json!(1u64 << 62)),
        ("n_layers", json!(TB)),
    ];
    for (key, v) in meta_params {
        let label = format!("params.json {key} = {v}");
        let mut params: Value = serde_json::from_str(SMALL_PARAMS).expect("JSON");
        params[key] = v;
        dir_case(c, &label, &["params.json"], |d| {
            write_meta(d, &params.to_string(), &[specs_for(SMALL_PARAMS)])
        });
    }
}

/// A tiktoken file made from scratch: the 256 bytes, then a few merges.
fn scratch_tiktoken(skip_byte: Option<u8>) -> Vec<u8> {
    let mut toks: Vec<Vec<u8>> = (0..=255u8)
        .filter(|&b| Some(b) != skip_byte)
        .map(|b| vec![b])
        .collect();
    for m in ["th", "he", "the", " the", "in", "er", "an", "ll", "'ll"] {
        toks.push(m.as_bytes().to_vec());
    }
    let mut out = String::new();
    for (i, t) in toks.iter().enumerate() {
        out.push_str(&format!("{} {i}\n", b64(t)));
    }
    out.into_bytes()
}

fn huge_tokenizer_files(c: &mut Cases) {
    let dir = tempfile::tempdir().expect("tempdir");

    // A billion-character line: a sparse file, so the test writes (and the disk holds) nothing.
    let p = dir.path().join("billion.model");
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(b"QQ== 0\nQg== 1\n").expect("write");
    f.set_len(1_000_000_016).expect("sparse file");
    let label = "tokenizer.model with a billion-character line";
    c.must_fail(label, &["billion.model"], || load_tokenizer(&p));
    let _ = std::fs::remove_file(&p);
    if Path::new("/dev/zero").exists() {
        let zero = Path::new("/dev/zero");
        c.must_fail("tokenizer /dev/zero (endless)", &["/dev/zero"], || {
            load_tokenizer(zero)
        });
    }

    let json = hf_json_from(&scratch_tiktoken(None));
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_slice(&json).expect("JSON");
        f(&mut v);
        serde_json::to_vec(&v).expect("JSON out")
    };
    let long_line = [b"QQ== 0\n".to_vec(), vec![b'Q'; 8 << 20], b" 1\n".to_vec()].concat();
    // (what, file, contents, usable: odd but still a tokenizer, so it may load)
    let cases: Vec<(&str, &str, Vec<u8>, bool)> = vec![
        ("an 8 MB line", "long.model", long_line, false),
        (
            "no token for byte 'A'",
            "no-a.model",
            scratch_tiktoken(Some(b'A')),
            false,
        ),
        (
            "265 tokens made from scratch",
            "scratch.model",
            scratch_tiktoken(None),
            true,
        ),
        (
            "added token id u32::MAX",
            "id-max.json",
            edit(&|v| v["added_tokens"][0]["id"] = json!(u32::MAX)),
            false,
        ),
        (
            "vocab id 2^31",
            "vocab-id.json",
            edit(&|v| v["model"]["vocab"]["A"] = json!(1u64 << 31)),
            false,
        ),
        (
            "200000 absurd merges",
            "merges.json",
            edit(&|v| {
                v["model"]["merges"] = (0..200_000)
                    .map(|i| json!(format!("x{i} y{i} z")))
                    .collect()
            }),
            true,
        ),
        (
            "merges that are not strings",
            "merges-kind.json",
            edit(&|v| {
                v["model"]["merges"] = json!([[1, [2, [3]]], null, {"a": 1}, deep_array(100)])
            }),
            true,
        ),
        (
            "4096 added tokens",
            "added.json",
            edit(&|v| {
                let extra = (0..4096 - 256)
                    .map(|i| json!({"id": 1000 + i, "content": format!("<|x{i}|>")}));
                v["added_tokens"]
                    .as_array_mut()
                    .expect("array")
                    .extend(extra)
            }),
            true,
        ),
        (
            "50000 added tokens",
            "added-many.json",
            edit(&|v| {
                let extra =
                    (0..50_000).map(|i| json!({"id": 1000 + i, "content": format!("<|x{i}|>")}));
                v["added_tokens"]
                    .as_array_mut()
                    .expect("array")
                    .extend(extra)
            }),
            false,
        ),
        (
            "a reserved added token of 256 bytes",
            "added-256.json",
            edit(&|v| v["added_tokens"][255]["content"] = json!("x".repeat(256))),
            true,
        ),
        (
            "a reserved added token of 3 MB",
            "added-long.json",
            edit(&|v| v["added_tokens"][255]["content"] = json!("x".repeat(3 << 20))),
            false,
        ),
        (
            "added_tokens a 3 MB string",
            "added-str.json",
            edit(&|v| v["added_tokens"] = json!("x".repeat(3 << 20))),
            false,
        ),
    ];
    for (what, name, bytes, usable) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        let label = format!("{name}: {what}");
        if usable {
            c.case(&label, &[name], || load_tokenizer(&p));
        } else {
            c.must_fail(&label, &[name], || load_tokenizer(&p));
        }
        let _ = std::fs::remove_file(&p);
    }
}

#[test]
fn files_built_to_hurt_fail_cleanly() {
    guarded("files_built_to_hurt_fail_cleanly", |c| {
        huge_model_files(c);
        huge_tokenizer_files(c);
    });
}

/// The cases of [`harness_reports_what_it_must`]: each breaks one rule, then one is fine.
fn harness_cases(c: &mut Cases) {
    c.case("panics", &["x"], || panic!("on purpose"));
    c.case("allocates 4 TB", &["x"], || {
        let v = vec![1u8; 1 << 42];
        Err(format!("x {}", v.len()))
    });
    c.case("hangs", &["x"], || {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(())
    });
    c.case("names the wrong file", &["x"], || Err("y".into()));
    c.case("echoes a long line", &["x"], || {
        Err(format!("x {}", "y".repeat(10_000)))
    });
    c.case("touches 600 MB", &["x"], || {
        let v = vec![1u8; 600 << 20];
        Err(format!(
            "x {}",
            v.iter().map(|&b| b as usize).sum::<usize>()
        ))
    });
    c.must_fail("loads a broken file", &["x"], || Ok(()));
    c.case("fails cleanly", &["x"], || Err("x: bad".into()));
}

/// The guard itself: a panic, a 4 TB allocation, a hang, an unclear or overlong error, a memory
/// hog and a broken file that loads are each reported against their case, and the cases after
/// an abort or a hang still run.
#[test]
fn harness_reports_what_it_must() {
    const TEST: &str = "harness_reports_what_it_must";
    if std::env::var(CHILD_ENV).as_deref() == Ok(TEST) {
        let mut cases = Cases::new();
        harness_cases(&mut cases);
        cases.finish();
        return;
    }
    let (fails, summaries) = supervise(TEST, 3);
    let failed: Vec<&str> = fails
        .iter()
        .map(|f| f.trim_start_matches('[').split(']').next().unwrap_or(""))
        .collect();
    assert_eq!(
        failed,
        [
            "panics",
            "allocates 4 TB",
            "hangs",
            "names the wrong file",
            "echoes a long line",
            "touches 600 MB",
            "loads a broken file"
        ],
        "{fails:#?}"
    );
    // The last child ran the last two cases.
    assert!(
        summaries.last().is_some_and(|s| s.starts_with("5 cases")),
        "{summaries:?}"
    );
}

/// tests/fixtures/malformed/: the findings kept as files (cases.json says where each goes, the
/// error it must end in and how it was found).
#[test]
fn regression_corpus_fails_cleanly() {
    guarded("regression_corpus_fails_cleanly", |c| {
        let corpus = fixture("malformed");
        let list = std::fs::read(corpus.join("cases.json")).expect("cases.json");
        let list: Vec<Value> = serde_json::from_slice(&list).expect("a JSON list");
        for case in &list {
            let field = |k: &str| case[k].as_str().map(String::from);
            let (Some(file), Some(name), Some(expect)) =
                (field("file"), field("as"), field("expect"))
            else {
                panic!("cases.json: {case} needs file, as and expect");
            };
            let bytes = std::fs::read(corpus.join(&file)).expect("corpus file");
            let dir = tempfile::tempdir().expect("tempdir");
            let label = format!("{file} as {name}");
            let base = match field("base").as_deref() {
                None => {
                    let p = dir.path().join(&name);
                    std::fs::write(&p, &bytes).expect("write");
                    c.must_fail_with(&label, &[&name], &expect, || load_tokenizer(&p));
                    continue;
                }
                Some("meta2") => meta2(),
                Some("tp2") => DirBase::converted("pth/hf"),
                Some(rel) => DirBase::read(rel),
            };
            base.with_file(&name, &bytes).write(dir.path(), None);
            c.must_fail_with(&label, &[&name], &expect, || load_model_dir(dir.path()));
        }
        assert_eq!(
            list.len() + 1,
            std::fs::read_dir(&corpus).expect("corpus dir").count(),
            "every file in tests/fixtures/malformed has its line in cases.json"
        );
    });
}
