//! The batch job: check or start the resume state, stream records through the engine with a
//! bounded read-ahead, append results to this replica's part, stop cleanly on a stop signal
//! (SIGTERM, SIGINT, SIGUSR1, SIGUSR2), then (world leader) merge the parts and report, and end
//! every rank together.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::ignored::Tally;
use super::input::{self, InputFormat, Item, ParseOptions, RecordReader};
use super::merge::{merge, OutputFormat};
use super::progress::{self, Counts, Progress};
use super::state::{self, PartWriter, Paths};
use super::{openai, world, BatchArgs, Truncate};
use crate::engine::kv_blocks::BlockPool;
use crate::engine::{Engine, Event, RequestOutput};
use crate::exit::{self, Coded};
use crate::modes::record::{error_record, result_record, with_metadata};
use crate::modes::setup::start;
use crate::modes::signals;
use crate::parallel::{Topology, World};
use crate::tokenizer::Tokenizer;

fn usage(e: anyhow::Error) -> anyhow::Error {
    Coded::with(exit::USAGE)(e)
}

/// `herd batch` in the world this process belongs to.
pub fn run(args: BatchArgs) -> Result<()> {
    let world = world::current(args.model.tp).map_err(|e| usage(anyhow!(e)))?;
    run_in(&args, world.as_ref())
}

/// The one place batch mode builds its engine: on a replica leader, the engine over this
/// replica's ranks (collective: the replica's other ranks are in [`serve_replica`] meanwhile).
fn engine_for(args: &BatchArgs, world: &dyn World) -> Result<Engine> {
    start(&args.model, world)
        .map_err(Coded::with(exit::MODEL))?
        .ok_or_else(|| anyhow!("internal: a replica leader got no engine"))
}

/// A tensor-parallel peer's part: load this rank's shard and run the forward of every step its
/// replica leader sends, until the leader's engine is dropped.
fn serve_replica(args: &BatchArgs, world: &dyn World) -> Result<()> {
    if start(&args.model, world)
        .map_err(Coded::with(exit::MODEL))?
        .is_some()
    {
        return Err(anyhow!("internal: a tensor-parallel peer got an engine"));
    }
    Ok(())
}

/// Everything that decides the records' content: a resume must match it.
fn identity(args: &BatchArgs, format: InputFormat, dp: usize) -> Result<Value> {
    let p = defaults(args);
    let mut id = json!({
        "input": state::input_identity(&args.input).map_err(usage)?,
        "input_format": format.as_str(),
        "model": args.model.model,
        "tokenizer": args.model.tokenizer,
        "max_seq_len": args.model.max_seq_len,
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "seed": p.seed,
        "stop": p.stop,
        "ignore_eos": p.ignore_eos,
        "logprobs": p.logprobs,
        "prompt_logprobs": p.prompt_logprobs,
        "skip_special_tokens": p.skip_special_tokens,
        "strict": args.strict,
        "served_model_name": args.served_model(),
        "truncate_prompt": matches!(args.truncate_prompt, Truncate::Left),
        "prompt_column": args.prompt_column,
        "id_column": args.id_column,
        "replicas": dp,
        "records": args.records.map(|r| r.label()),
    });
    // Only when set: outputs started before the flag existed still resume.
    if let Some(cap) = args.max_tokens_cap {
        id["max_tokens_cap"] = json!(cap);
    }
    if args.n != 1 {
        id["n"] = json!(args.n);
    }
    Ok(id)
}

fn defaults(args: &BatchArgs) -> crate::engine::SamplingParams {
    // Meta's example defaults for completion, as `herd generate`.
    let mut p = args.sampling.params(0.6, 0.9, 0);
    p.logprobs = args.logprobs;
    p.prompt_logprobs = args.prompt_logprobs;
    p
}

/// Records of `total` that replica `r` of `dp` owns.
fn owned(total: u64, dp: usize, r: usize) -> u64 {
    let dp = dp as u64;
    (total + dp - 1 - r as u64) / dp
}

/// What one replica leaves in its part state when it stops.
fn replica_state(
    identity: &Value,
    total: u64,
    counts: &Counts,
    wall: f64,
    complete: bool,
) -> Value {
    json!({
        "identity": identity,
        "complete": complete,
        "total": total,
        "records": counts.records,
        "errors": counts.errors,
        "resumed": counts.resumed,
        "prompt_tokens": counts.prompt_tokens,
        "cached_prompt_tokens": counts.cached_prompt_tokens,
        "computed_prompt_tokens": counts.computed_prompt_tokens,
        "generated_tokens": counts.generated_tokens,
        "wall_s": wall,
    })
}

/// `herd batch` as one rank of `world`: check the flags, settle what this run is (resume, start
/// over, or nothing to do), run this rank's share, meet the other ranks, and (world leader) merge
/// and report; every rank then ends with the leader's code.
pub fn run_in(args: &BatchArgs, world: &dyn World) -> Result<()> {
    // First, on every rank: a stop signal from now on ends in a clean stop (exit 4); a rank without
    // a handler would die of it and take the job with it.
    let stop = install_signals()?;
    let job = Job::new(args, world.topology())?;
    // Held (by the world leader) until this function returns, however it returns.
    let _lock = lock_output(world, &job)?;
    if job.finished_before(args)? {
        return Ok(());
    }
    job.check_resume(args, world)?;
    let t0 = Instant::now();
    let share = if world.topology().is_replica_leader() {
        run_replica(args, world, &job, &stop, t0)
    } else {
        serve_replica(args, world).map(|()| Share::default())
    };
    // A replica that fails still meets the others at the barrier (they would wait forever), then
    // reports its error.
    world
        .barrier()
        .map_err(|e| anyhow!("waiting for the other replicas: {e}"))?;
    let end = share.and_then(|share| {
        if job.leader {
            merge_and_report(args, &job, share.total, share.ignored.as_ref())
        } else {
            finish_code(args, share.interrupted, share.errors)
        }
    });
    leave_together(world, &job, end)
}

/// Every rank ends with the world leader's code, once the leader has merged and reported: a rank
/// that exits first with a non-zero code makes mpirun (or srun --kill-on-bad-exit) kill the
/// others, cutting short their grace period and the leader's summary.
fn leave_together(world: &dyn World, job: &Job, end: Result<()>) -> Result<()> {
    let code = match &end {
        Ok(()) => exit::OK,
        Err(e) => e.downcast_ref::<Coded>().map_or(exit::FAILED, |c| c.code),
    };
    let agreed = matches!(code, exit::OK | exit::INTERRUPTED | exit::RECORD_ERRORS);
    // A rank's own failure ends the job at once (MPI_Abort), as before.
    if !job.leader && !agreed {
        return end;
    }
    let (leaders, _) = from_leader(world, code, String::new())?;
    if job.leader {
        return match end {
            Err(e) if agreed => Err(Coded::together(code)(e)),
            end => end,
        };
    }
    match leaders {
        exit::OK => Ok(()),
        // Rank 0 says why (or, failing, aborts the job with its own message).
        c => Err(Coded::together(c)(anyhow!(
            "the world leader ended the job with code {c}"
        ))),
    }
}

/// World rank 0's code and message on every rank (collective): how the ranks agree on what only
/// the world leader decides.
fn from_leader(world: &dyn World, code: i32, msg: String) -> Result<(i32, String)> {
    let mut buf = code.to_le_bytes().to_vec();
    buf.extend_from_slice(msg.as_bytes());
    world
        .world_comm()
        .broadcast_bytes(0, &mut buf)
        .map_err(|e| anyhow!("waiting for the world leader: {e}"))?;
    let Some((code, msg)) = buf.split_first_chunk::<4>() else {
        bail!("internal: the world leader sent {} bytes", buf.len());
    };
    Ok((
        i32::from_le_bytes(*code),
        String::from_utf8_lossy(msg).into_owned(),
    ))
}

/// The world leader locks the output for the whole run, and every rank learns whether it could
/// (collective): a second run on the same output, with any number of ranks, stops on all of
/// them before any reads or writes a part.
fn lock_output(world: &dyn World, job: &Job) -> Result<Option<state::OutputLock>> {
    let path = job.paths.lock();
    let (mut lock, mut code, mut msg) = (None, exit::OK, String::new());
    if job.leader {
        match state::OutputLock::acquire(&path, &lock_holder()) {
            Ok(state::Lock::Held(l)) => lock = Some(l),
            Ok(state::Lock::Busy(who)) => {
                code = exit::USAGE;
                msg = format!(
                    "{} is being written by another herd batch ({who}; lock {}): wait for it to \
                     end or stop it (SIGUSR1 to that pid or to its mpirun; scancel), or choose \
                     another --output",
                    job.paths.output.display(),
                    path.display()
                );
            }
            Ok(state::Lock::Unsupported(e)) => tracing::warn!(
                "cannot lock {} ({e}): this file system does not do flock (Lustre: mount with \
                 -o flock); a second run on the same output would not be refused",
                path.display()
            ),
            Err(e) => (code, msg) = (exit::FAILED, format!("{e:#}")),
        }
    }
    let (code, msg) = from_leader(world, code, msg)?;
    if code != exit::OK {
        return Err(Coded::together(code)(anyhow!(msg)));
    }
    Ok(lock)
}

/// What the lock file says about its holder, for a second run's message.
fn lock_holder() -> Value {
    json!({
        "host": crate::parallel::cluster().hostname,
        "pid": std::process::id(),
        "slurm_job": std::env::var("SLURM_JOB_ID").ok(),
        "started": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// What this run works on, settled before any part is read.
struct Job {
    format: InputFormat,
    out_format: OutputFormat,
    paths: Paths,
    /// Everything that decides the records' content (see [`identity`]).
    ident: Value,
    /// Replicas, and this rank's.
    dp: usize,
    r: usize,
    /// The world leader merges and reports.
    leader: bool,
}

impl Job {
    fn new(args: &BatchArgs, topo: &Topology) -> Result<Job> {
        let format = match args.input_format {
            Some(f) => f,
            None => input::detect_format(&args.input)
                .with_context(|| format!("reading {}", args.input.display()))
                .map_err(usage)?,
        };
        if format == InputFormat::Csv && args.prompt_column.is_none() {
            tracing::info!("CSV input: prompts from the `prompt` column (see --prompt-column)");
        }
        if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Job {
            format,
            out_format: OutputFormat::from_path(&args.output),
            paths: Paths {
                output: args.output.clone(),
            },
            ident: identity(args, format, topo.n_replicas)?,
            dp: topo.n_replicas,
            r: topo.replica,
            leader: topo.is_world_leader(),
        })
    }

    /// A finished output: true when there is nothing to do; refused if it was made differently;
    /// removed with --overwrite.
    fn finished_before(&self, args: &BatchArgs) -> Result<bool> {
        let paths = &self.paths;
        let Some(st) = state::read_state(&paths.final_state())? else {
            return Ok(false);
        };
        // A finished output is the same whatever number of replicas made it.
        let diff = state::identity_diff(&st, &self.ident, &["replicas"]);
        if args.overwrite {
            if self.leader {
                let _ = std::fs::remove_file(&paths.output);
                let _ = std::fs::remove_file(paths.final_state());
            }
        } else if !diff.is_empty() {
            return Err(usage(anyhow!(
                "{} was made with other settings ({}); pass --overwrite to start over, or choose another --output",
                args.output.display(),
                diff.join("; ")
            )));
        } else if paths.output.exists() {
            if self.leader {
                eprintln!(
                    "batch: {} is already complete ({} records); nothing to do",
                    args.output.display(),
                    st["records"]
                );
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// The parts on disk, settled by the world leader before any replica reads or writes one
    /// (collective, same answer on every rank): start over (--overwrite), resume parts made
    /// with the same settings (by any number of replicas), or refuse an output this job did
    /// not write.
    fn check_resume(&self, args: &BatchArgs, world: &dyn World) -> Result<()> {
        let (mut code, mut msg) = (exit::OK, String::new());
        if self.leader {
            if let Err(e) = state::settle_parts(&self.paths, &self.ident, self.dp, args.overwrite) {
                (code, msg) = (exit::code_of(&e), format!("{e:#}"));
            }
        }
        let (code, msg) = from_leader(world, code, msg)?;
        if code != exit::OK {
            return Err(Coded::together(code)(anyhow!(msg)));
        }
        Ok(())
    }
}

/// How this rank's share of the job ended (a tensor-parallel peer's: the default).
#[derive(Default)]
struct Share {
    /// Records in the input (the chunk), as this replica's reader counted them.
    total: u64,
    interrupted: bool,
    errors: u64,
    /// What herd ignored in the records (every replica reads every record).
    ignored: Option<Tally>,
}

/// A replica leader's share: pick up its part, load the model, generate until the input ends or
/// a signal stops it, and leave the part's state behind.
fn run_replica(
    args: &BatchArgs,
    world: &dyn World,
    job: &Job,
    stop: &Arc<AtomicBool>,
    t0: Instant,
) -> Result<Share> {
    let (paths, dp, r) = (&job.paths, job.dp, job.r);
    let parts = state::existing_parts(paths)?;
    let scan = state::scan_parts(paths, &parts, dp, r)?;
    let mut counts = Counts {
        records: scan.records,
        errors: scan.errors,
        resumed: scan.records,
        ..Counts::default()
    };
    if scan.records > 0 && job.leader {
        eprintln!(
            "{}: resuming: {} records already done",
            progress::label(dp, r),
            scan.records
        );
    }
    state::write_state(
        &paths.part_state(r),
        &replica_state(&job.ident, 0, &counts, 0.0, false),
    )?;
    let mut engine = engine_for(args, world)?;
    let mut count = input::count_records(&args.input, job.format)?;
    if let Some(range) = args.records {
        count = range.count_of(count);
    }
    let mut progress = Progress::new(
        owned(count, dp, r),
        counts.records,
        job.leader,
        args.log_interval,
        progress::label(dp, r),
    );
    let outcome = generate(
        args,
        &mut engine,
        job.format,
        scan.done,
        dp,
        r,
        paths,
        &mut counts,
        &mut progress,
        stop,
    );
    progress.finish();
    let outcome = outcome?;
    let complete = !outcome.interrupted && counts.records == owned(outcome.total, dp, r);
    state::write_state(
        &paths.part_state(r),
        &replica_state(
            &job.ident,
            outcome.total,
            &counts,
            t0.elapsed().as_secs_f64(),
            complete,
        ),
    )?;
    Ok(Share {
        total: outcome.total,
        interrupted: outcome.interrupted,
        errors: counts.errors,
        ignored: Some(outcome.ignored),
    })
}

/// World leader, after every replica stopped: merge the parts when all are complete, report,
/// and end with the job's code.
fn merge_and_report(
    args: &BatchArgs,
    job: &Job,
    total: u64,
    ignored: Option<&Tally>,
) -> Result<()> {
    let (paths, dp) = (&job.paths, job.dp);
    let mut states = Vec::with_capacity(dp);
    for k in 0..dp {
        let st = state::read_state(&paths.part_state(k))?.ok_or_else(|| {
            anyhow!(
                "replica {k} left no state ({})",
                paths.part_state(k).display()
            )
        })?;
        states.push(st);
    }
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let all_done = states.iter().all(|s| s["complete"] == true);
    let records: u64 = states.iter().map(|s| u(s, "records")).sum();
    let errors: u64 = states.iter().map(|s| u(s, "errors")).sum();
    if all_done {
        let total = states.iter().map(|s| u(s, "total")).max().unwrap_or(total);
        let extra = input::extra_columns(
            &args.input,
            job.format,
            args.prompt_column.as_deref(),
            args.id_column.as_deref(),
        )?;
        // This world's parts and any an earlier world (another number of replicas) left.
        let parts = state::existing_parts(paths)?;
        merge(paths, &parts, total, job.out_format, extra.as_deref())?;
        state::write_state(
            &paths.final_state(),
            &json!({"identity": job.ident, "complete": true, "records": total, "errors": errors}),
        )?;
        for k in parts {
            let _ = std::fs::remove_file(paths.part(k));
            let _ = std::fs::remove_file(paths.part_state(k));
        }
    }
    report(args, &states, all_done, records, errors)?;
    if let Some(t) = ignored {
        t.warn(&args.served_model(), args.strict);
    }
    if !all_done {
        return Err(Coded::with(exit::INTERRUPTED)(anyhow!(
            "interrupted: {records} records are on disk; rerun the same command to resume"
        )));
    }
    finish_code(args, false, errors)
}

fn finish_code(args: &BatchArgs, interrupted: bool, errors: u64) -> Result<()> {
    if interrupted {
        return Err(Coded::with(exit::INTERRUPTED)(anyhow!(
            "interrupted: what was done is on disk; rerun the same command to resume"
        )));
    }
    if args.fail_on_error && errors > 0 {
        return Err(Coded::with(exit::RECORD_ERRORS)(anyhow!(
            "{errors} records are error records (--fail-on-error)"
        )));
    }
    Ok(())
}

/// A stop signal sets the flag; a second one exits at once with the interrupted code.
fn install_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    signals::on_stop_then_exit(&stop, exit::INTERRUPTED)?;
    Ok(stop)
}

/// The reader thread: how many records it read, and what herd ignored in them.
type ReaderThread = std::thread::JoinHandle<Result<(u64, Tally)>>;

struct Outcome {
    total: u64,
    interrupted: bool,
    ignored: Tally,
}

/// What the writer needs to answer a running record.
struct Pending {
    index: u64,
    id: Value,
    metadata: Option<Value>,
    openai: Option<input::OpenAiInfo>,
    /// Engine ids of its samples (n), in sample order, and their outputs as they finish.
    samples: Vec<u64>,
    outs: Vec<Option<RequestOutput>>,
}

/// Turns results into output records and appends them.
struct Writer<'a> {
    part: PartWriter,
    model: &'a str,
    created: u64,
    last_sync: Instant,
}

impl Writer<'_> {
    fn error(
        &mut self,
        item_index: u64,
        id: Value,
        metadata: Option<Value>,
        openai: bool,
        msg: &str,
        c: &mut Counts,
    ) -> Result<()> {
        let rec = if openai {
            openai::failure(item_index, &id, msg)
        } else {
            with_metadata(error_record(Some(id), msg), metadata)
        };
        self.part.append(item_index, true, &rec)?;
        c.records += 1;
        c.errors += 1;
        Ok(())
    }

    fn result(
        &mut self,
        p: Pending,
        outs: &[RequestOutput],
        tok: &Tokenizer,
        c: &mut Counts,
    ) -> Result<()> {
        let rec = match &p.openai {
            Some(info) => {
                openai::success(p.index, &p.id, info, self.model, self.created, tok, outs)
            }
            None => with_metadata(result_record(Some(p.id), outs), p.metadata),
        };
        self.part.append(p.index, false, &rec)?;
        c.records += 1;
        // The prompt once, the completions summed (as the record's usage).
        if let Some(first) = outs.first() {
            c.prompt_tokens += first.prompt_tokens as u64;
            c.cached_prompt_tokens += first.cached_tokens as u64;
        }
        c.generated_tokens += outs.iter().map(|o| o.token_ids.len() as u64).sum::<u64>();
        // fsync about once a second: a machine crash loses at most that much work.
        if self.last_sync.elapsed() >= Duration::from_secs(1) {
            self.part.sync()?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }
}

/// Parse and tokenize records on a thread, ahead of the engine, at most `read_ahead` at a time.
#[allow(clippy::too_many_arguments)]
fn spawn_reader(
    args: &BatchArgs,
    format: InputFormat,
    tok: Arc<Tokenizer>,
    max_len: usize,
    done: state::DoneSet,
    dp: usize,
    r: usize,
    stop: Arc<AtomicBool>,
) -> Result<(Receiver<Item>, ReaderThread)> {
    let opts = ParseOptions {
        format,
        defaults: defaults(args),
        n: args.n,
        max_len,
        truncate_left: matches!(args.truncate_prompt, Truncate::Left),
        prompt_column: args.prompt_column.clone(),
        id_column: args.id_column.clone(),
        strict: args.strict,
        csv_output: OutputFormat::from_path(&args.output) == OutputFormat::Csv,
        served_model: args.served_model(),
    };
    let mut reader = RecordReader::open(&args.input, format)
        .with_context(|| format!("reading {}", args.input.display()))
        .map_err(usage)?;
    let range = args.records;
    let cap = args.max_tokens_cap;
    let (tx, rx) = sync_channel::<Item>(args.read_ahead);
    let handle = std::thread::Builder::new()
        .name("batch-reader".into())
        .spawn(move || -> Result<(u64, Tally)> {
            let headers = reader.headers().to_vec();
            let mut ids = input::IdSet::default();
            let mut ignored = Tally::default();
            // `index` numbers the records of the --records chunk (all of the file without it):
            // replica ownership, resume and merge order all go by it.
            let mut index = 0u64;
            let mut in_file = 0u64;
            while let Some((line, raw)) = reader.next_record()? {
                // On a signal stop at once: the rest of the file may hold none of our records,
                // and reading it all would outlast the grace period.
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = in_file;
                in_file += 1;
                if let Some(range) = range {
                    if range.is_past(n) {
                        break;
                    }
                    if !range.contains(n) {
                        continue;
                    }
                }
                let i = index;
                index += 1;
                let parsed = input::parse_record(raw, line, &opts, &headers);
                ignored.add(&parsed.notes);
                // Every replica sees every id, so all agree which occurrence is the duplicate.
                let fresh = ids.insert(&parsed.id);
                if i % dp as u64 != r as u64 || done.contains(i) {
                    continue;
                }
                let body = match parsed.content {
                    Err(e) => Err(e),
                    Ok(_) if !fresh => Err(format!("line {line}: duplicate id {}", parsed.id)),
                    Ok(mut c) => {
                        super::cap_max_tokens(&mut c.params, cap);
                        input::prepare(c, &tok, &opts).map_err(|e| format!("line {line}: {e}"))
                    }
                };
                let item = Item {
                    index: i,
                    line,
                    id: parsed.id,
                    metadata: parsed.metadata,
                    body,
                };
                if tx.send(item).is_err() {
                    break; // the run stopped
                }
            }
            Ok((index, ignored))
        })?;
    Ok((rx, handle))
}

#[allow(clippy::too_many_arguments)]
fn generate(
    args: &BatchArgs,
    engine: &mut Engine,
    format: InputFormat,
    done: state::DoneSet,
    dp: usize,
    r: usize,
    paths: &Paths,
    counts: &mut Counts,
    progress: &mut Progress,
    stop: &Arc<AtomicBool>,
) -> Result<Outcome> {
    let tok = engine.tokenizer().clone();
    let (rx, reader) = spawn_reader(
        args,
        format,
        tok.clone(),
        engine.max_len(),
        done,
        dp,
        r,
        Arc::clone(stop),
    )?;
    let served = args.served_model();
    let mut writer = Writer {
        part: PartWriter::open(&paths.part(r))?,
        model: &served,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        last_sync: Instant::now(),
    };
    let is_openai = format == InputFormat::Openai;
    // Enough engine requests queued to keep every batch slot busy; the reader's channel and the
    // admission window hold the rest.
    let max_inflight = 2 * args.model.max_batch_size.max(1);
    // Engine request id -> the record it is a sample of; records by index.
    let mut inflight: HashMap<u64, u64> = HashMap::new();
    let mut records: HashMap<u64, Pending> = HashMap::new();
    let mut window = Window::new(args.read_ahead, engine.block_size());
    let mut input_open = true;
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_none() && stop.load(Ordering::Relaxed) {
            deadline = Some(Instant::now() + Duration::from_secs_f64(args.grace_period));
            eprintln!(
                "{}: stopping: finishing {} in-flight records for up to {}s (a second signal stops at once)",
                progress::label(dp, r),
                records.len(),
                args.grace_period
            );
        }
        if deadline.is_none() {
            // Fill the admission window from the reader: records with errors are answered at
            // once, ready ones wait to be admitted by prefix.
            while input_open && window.len() < args.read_ahead {
                let item = if inflight.is_empty() && window.len() == 0 {
                    match rx.recv() {
                        Ok(it) => it,
                        Err(_) => {
                            input_open = false;
                            break;
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(it) => it,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            input_open = false;
                            break;
                        }
                    }
                };
                match item.body {
                    Ok(ready) => window.push(
                        Waiting {
                            index: item.index,
                            line: item.line,
                            id: item.id,
                            metadata: item.metadata,
                            ready,
                        },
                        engine.pool(),
                    ),
                    Err(e) => {
                        writer.error(item.index, item.id, item.metadata, is_openai, &e, counts)?
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            while inflight.len() < max_inflight {
                let Some(w) = window.pop() else {
                    break;
                };
                let openai = w.ready.openai;
                let n = w.ready.n;
                match engine.add_request_n(w.ready.prompt, w.ready.params, n) {
                    Ok(ids) => {
                        for &rid in &ids {
                            inflight.insert(rid, w.index);
                        }
                        records.insert(
                            w.index,
                            Pending {
                                index: w.index,
                                id: w.id,
                                metadata: w.metadata,
                                openai,
                                samples: ids,
                                outs: vec![None; n],
                            },
                        );
                    }
                    Err(e) => {
                        let msg = format!("line {}: {e}", w.line);
                        writer.error(w.index, w.id, w.metadata, is_openai, &msg, counts)?;
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        progress.update(counts);
        if inflight.is_empty() {
            if (!input_open && window.len() == 0) || deadline.is_some() {
                break;
            }
            continue;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // Abandoned records are not written: the rerun does them.
            let ids: Vec<u64> = inflight.keys().copied().collect();
            for id in ids {
                engine.abort(id);
            }
            inflight.clear();
            records.clear();
            break;
        }
        let events = engine
            .step()
            .map_err(|e| Coded::with(exit::MODEL)(anyhow!(e).context("the model failed")))?;
        for ev in events {
            let Event::Finished(out) = ev else {
                continue;
            };
            let Some(index) = inflight.remove(&out.id) else {
                continue;
            };
            let Some(p) = records.get_mut(&index) else {
                continue;
            };
            if let Some(k) = p.samples.iter().position(|&s| s == out.id) {
                p.outs[k] = Some(out);
            }
            if p.outs.iter().all(Option::is_some) {
                if let Some(mut p) = records.remove(&index) {
                    let outs: Vec<RequestOutput> = p.outs.drain(..).flatten().collect();
                    writer.result(p, &outs, &tok, counts)?;
                }
            }
        }
    }
    counts.computed_prompt_tokens = engine.stats().prefill_tokens;
    let st = engine.stats();
    if st.prefill_tokens + st.cached_prompt_tokens > 0 {
        tracing::info!(
            computed = st.prefill_tokens,
            from_cache = st.cached_prompt_tokens,
            "{}: prefix cache served {:.1}% of prompt tokens",
            progress::label(dp, r),
            100.0 * st.prefix_hit_rate()
        );
    }
    writer.part.sync()?;
    progress.update(counts);
    // The reader also stops on the signal, so a signal means the input may not have been read
    // to its end: never count such a run as complete.
    let interrupted = deadline.is_some() || stop.load(Ordering::Relaxed);
    // Dropping the receiver ends the reader if it is blocked on a full channel.
    drop(rx);
    let (total, ignored) = match reader.join() {
        Ok(res) => res.with_context(|| format!("reading {}", args.input.display()))?,
        Err(_) => bail!("the input reader thread panicked"),
    };
    Ok(Outcome {
        total,
        interrupted,
        ignored,
    })
}

/// A record read and tokenized, waiting for admission.
struct Waiting {
    index: u64,
    line: u64,
    id: Value,
    metadata: Option<Value>,
    ready: input::Ready,
}

/// The admission window (`--read-ahead` records): the next record admitted is the one whose
/// prompt shares the most leading KV blocks with the last one admitted (ties and no sharing: the
/// oldest), so records with a common prefix run together and hit the prefix cache while it holds
/// their blocks. Output order does not change (the merge orders by record), nor does any
/// result (it never depends on the batch). A record passed over `capacity` times goes next.
struct Window {
    items: std::collections::VecDeque<(Waiting, Vec<u64>, usize)>,
    last: Vec<u64>,
    capacity: usize,
    block_size: usize,
}

/// Leading blocks compared when grouping (longer prefixes group the same way).
const GROUP_BLOCKS: usize = 64;

impl Window {
    fn new(capacity: usize, block_size: usize) -> Window {
        Window {
            items: Default::default(),
            last: Vec::new(),
            capacity: capacity.max(1),
            block_size,
        }
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn push(&mut self, w: Waiting, pool: &BlockPool) {
        let p = &w.ready.prompt;
        let upto = p.len().min(GROUP_BLOCKS * self.block_size);
        let mut hashes = Vec::new();
        pool.extend_hashes(&mut hashes, &p[..upto]);
        self.items.push_back((w, hashes, 0));
    }

    fn pop(&mut self) -> Option<Waiting> {
        let shared = |h: &[u64]| h.iter().zip(&self.last).take_while(|(a, b)| a == b).count();
        let mut pick = 0;
        if self.items.front().is_some_and(|f| f.2 < self.capacity) {
            let mut best = 0;
            for (k, (_, h, _)) in self.items.iter().enumerate() {
                let s = shared(h);
                if s > best {
                    (best, pick) = (s, k);
                }
            }
        }
        for item in self.items.iter_mut().take(pick) {
            item.2 += 1;
        }
        let (w, hashes, _) = self.items.remove(pick)?;
        self.last = hashes;
        Some(w)
    }
}

/// The summary on stderr (and a CSV row with --stats-csv).
fn report(
    args: &BatchArgs,
    states: &[Value],
    complete: bool,
    records: u64,
    errors: u64,
) -> Result<()> {
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let pin: u64 = states.iter().map(|s| u(s, "prompt_tokens")).sum();
    let cached: u64 = states.iter().map(|s| u(s, "cached_prompt_tokens")).sum();
    let computed: u64 = states.iter().map(|s| u(s, "computed_prompt_tokens")).sum();
    let gen: u64 = states.iter().map(|s| u(s, "generated_tokens")).sum();
    let wall = states.iter().map(|s| f(s, "wall_s")).fold(0.0, f64::max);
    eprintln!(
        "batch {}: {records} records ({errors} errors) -> {}; this run: prompt {pin} tokens (cached_prompt_tokens {cached}, computed {computed}), generated {gen} tokens in {wall:.1} s ({:.1} generated tokens/s), peak memory {} MB",
        if complete { "done" } else { "interrupted" },
        args.output.display(),
        gen as f64 / wall.max(1e-9),
        crate::modes::setup::peak_rss().map(|b| b / 1024).map_or("?".into(), |kb| format!("{:.1}", kb as f64 / 1024.0)),
    );
    if states.len() > 1 {
        for (k, s) in states.iter().enumerate() {
            eprintln!(
                "  replica {k}: {} records ({} resumed, {} errors), prompt {} tokens, generated {} tokens in {:.1} s ({:.1} tokens/s)",
                u(s, "records"),
                u(s, "resumed"),
                u(s, "errors"),
                u(s, "prompt_tokens"),
                u(s, "generated_tokens"),
                f(s, "wall_s"),
                u(s, "generated_tokens") as f64 / f(s, "wall_s").max(1e-9)
            );
        }
    }
    let Some(path) = &args.stats_csv else {
        return Ok(());
    };
    let new = !path.exists();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut w = csv::Writer::from_writer(file);
    if new {
        w.write_record([
            "date",
            "commit",
            "machine",
            "model",
            "input",
            "replica",
            "max_batch_size",
            "complete",
            "records",
            "errors",
            "prompt_tokens",
            "generated_tokens",
            "wall_s",
            "prompt_tokens_per_s",
            "generated_tokens_per_s",
            "cached_prompt_tokens",
            "computed_prompt_tokens",
            "prefix_cache",
        ])?;
    }
    let machine = crate::modes::host::machine_name();
    // The whole run first, then each replica when there are several: one shape for all rows.
    let all = json!({
        "records": records, "errors": errors, "prompt_tokens": pin, "generated_tokens": gen,
        "wall_s": wall, "cached_prompt_tokens": cached, "computed_prompt_tokens": computed,
    });
    let mut rows: Vec<(String, &Value)> = vec![("all".into(), &all)];
    if states.len() > 1 {
        rows.extend(states.iter().enumerate().map(|(k, s)| (k.to_string(), s)));
    }
    for (replica, s) in rows {
        let (pin, gen, wall) = (
            u(s, "prompt_tokens"),
            u(s, "generated_tokens"),
            f(s, "wall_s"),
        );
        w.write_record([
            crate::modes::host::today_utc(),
            env!("HERD_GIT_COMMIT").to_string(),
            machine.clone(),
            args.model.model.clone(),
            args.input.display().to_string(),
            replica,
            args.model.max_batch_size.to_string(),
            complete.to_string(),
            u(s, "records").to_string(),
            u(s, "errors").to_string(),
            pin.to_string(),
            gen.to_string(),
            format!("{wall:.3}"),
            format!("{:.1}", pin as f64 / wall.max(1e-9)),
            format!("{:.1}", gen as f64 / wall.max(1e-9)),
            u(s, "cached_prompt_tokens").to_string(),
            u(s, "computed_prompt_tokens").to_string(),
            (!args.model.no_prefix_cache).to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(index: u64, prompt: Vec<u32>) -> Waiting {
        Waiting {
            index,
            line: index + 1,
            id: json!(index),
            metadata: None,
            ready: input::Ready {
                prompt,
                params: Default::default(),
                n: 1,
                openai: None,
            },
        }
    }

    /// Prompt of `blocks` 4-token blocks: a prefix family `fam`, then the record's own tokens.
    fn prompt(fam: u32, own: u32) -> Vec<u32> {
        let mut p: Vec<u32> = (0..8).map(|i| fam * 100 + i).collect();
        p.extend((0..5).map(|i| 10_000 + own * 10 + i));
        p
    }

    #[test]
    fn the_window_admits_records_sharing_a_prefix_together_and_starves_none() {
        let pool = BlockPool::new(4, 4);
        let mut w = Window::new(3, 4);
        // Families interleaved: 1 2 1 2 1 3.
        for (i, fam) in [1, 2, 1, 2, 1, 3].into_iter().enumerate() {
            w.push(waiting(i as u64, prompt(fam, i as u32)), &pool);
        }
        let order: Vec<u64> = std::iter::from_fn(|| w.pop().map(|x| x.index)).collect();
        // 0 (oldest), then its family (2, 4); record 1 was passed over twice, then 3 (its
        // family) and 5. With a capacity of 3 the front is passed over at most 3 times.
        assert_eq!(order, vec![0, 2, 4, 1, 3, 5]);

        let mut w = Window::new(1, 4);
        for (i, fam) in [1, 2, 1, 1].into_iter().enumerate() {
            w.push(waiting(i as u64, prompt(fam, i as u32)), &pool);
        }
        let order: Vec<u64> = std::iter::from_fn(|| w.pop().map(|x| x.index)).collect();
        // Record 1 is passed over once (the capacity), then goes next.
        assert_eq!(order, vec![0, 2, 1, 3]);
    }
}
