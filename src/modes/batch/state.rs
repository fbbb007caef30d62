//! Output part files and the resume state beside them.
//!
//! Replica `r` appends finished records to `OUT.part-r`, one line each, written with a single
//! `write` so a crash can only tear the last line; on resume a torn or unreadable tail is cut off
//! and the records before it count as done. Done is per record, whichever part holds it: a rerun
//! with another number of replicas reads every part of the earlier world, takes only the records
//! none holds, and the merge reads them all. `OUT.part-r.state` remembers what produced the part
//! (input identity, model, parameters) so a resume with different settings is refused, and
//! whether the replica finished. After the merge `OUT.state` marks the whole output complete.
//! `OUT.lock` is held by the run writing the output ([`OutputLock`]).
//!
//! Part lines: `{"i":INDEX,"e":0|1,"r":RECORD}` (record number, error flag, the output record).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// Paths of everything batch mode writes for one output.
#[derive(Clone, Debug)]
pub struct Paths {
    pub output: PathBuf,
}

impl Paths {
    fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut s = self.output.clone().into_os_string();
        s.push(suffix);
        PathBuf::from(s)
    }
    pub fn part(&self, r: usize) -> PathBuf {
        self.with_suffix(&format!(".part-{r}"))
    }
    pub fn part_state(&self, r: usize) -> PathBuf {
        self.with_suffix(&format!(".part-{r}.state"))
    }
    /// Written after the merge: the output is complete.
    pub fn final_state(&self) -> PathBuf {
        self.with_suffix(".state")
    }
    pub fn merge_tmp(&self) -> PathBuf {
        self.with_suffix(".merging")
    }
    /// Held by the run writing this output (see [`OutputLock`]).
    pub fn lock(&self) -> PathBuf {
        self.with_suffix(".lock")
    }
}

/// Size plus a hash of the first and last MiB: cheap, and catches edits and swapped files.
pub fn input_identity(path: &Path) -> Result<Value> {
    use std::hash::Hasher;
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let n = read_full(&mut f, &mut buf)?;
    h.write(&buf[..n]);
    if len > (1 << 21) {
        f.seek(SeekFrom::Start(len - (1 << 20)))?;
        let n = read_full(&mut f, &mut buf)?;
        h.write(&buf[..n]);
    }
    Ok(json!({"bytes": len, "sample_hash": format!("{:016x}", h.finish())}))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Read a JSON state file, `None` if absent.
pub fn read_state(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(serde_json::from_str(&s).with_context(|| {
            format!(
                "{} is not a herd state file; remove it or pass --overwrite",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write a state file atomically (temp file + rename), so it is never half written.
pub fn write_state(path: &Path, v: &Value) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(v)?.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The keys of `identity` whose values differ in `state` (for a precise mismatch message).
pub fn identity_diff(state: &Value, identity: &Value, ignore: &[&str]) -> Vec<String> {
    let old = &state["identity"];
    match identity.as_object() {
        Some(m) => m
            .iter()
            .filter(|(k, v)| !ignore.contains(&k.as_str()) && old.get(k.as_str()) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: was {}, now {v}",
                    old.get(k.as_str()).cloned().unwrap_or(Value::Null)
                )
            })
            .collect(),
        None => vec!["identity".into()],
    }
}

/// Which record numbers are done, whichever part holds them: one bit per record (1.25 MB per
/// 10 M records). Global, not per replica, so a rerun with another number of replicas knows what
/// an earlier world finished.
#[derive(Default)]
pub struct DoneSet {
    bits: Vec<u64>,
}

impl DoneSet {
    /// Mark `index` done; false when it already was.
    pub fn insert(&mut self, index: u64) -> bool {
        let k = index as usize;
        if self.bits.len() <= k / 64 {
            self.bits.resize(k / 64 + 1, 0);
        }
        let was = self.bits[k / 64] & (1 << (k % 64)) != 0;
        self.bits[k / 64] |= 1 << (k % 64);
        !was
    }
    pub fn contains(&self, index: u64) -> bool {
        let k = index as usize;
        self.bits
            .get(k / 64)
            .is_some_and(|w| w & (1 << (k % 64)) != 0)
    }
}

/// Parse a part line's record number, error flag and the record's JSON text.
pub fn parse_part_line(line: &str) -> Option<(u64, bool, &str)> {
    let rest = line.strip_prefix("{\"i\":")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let index: u64 = rest[..digits].parse().ok()?;
    let rest = rest[digits..].strip_prefix(",\"e\":")?;
    let err = match rest.as_bytes().first()? {
        b'0' => false,
        b'1' => true,
        _ => return None,
    };
    let record = rest[1..].strip_prefix(",\"r\":")?.strip_suffix('}')?;
    Some((index, err, record))
}

/// Format a part line (with its newline).
pub fn part_line(index: u64, error: bool, record: &Value) -> String {
    format!(
        "{{\"i\":{index},\"e\":{},\"r\":{record}}}\n",
        u8::from(error)
    )
}

/// The part numbers beside the output (`OUT.part-K` or its `.state`), of this run's world or of
/// an earlier one with another number of replicas, in order.
pub fn existing_parts(paths: &Paths) -> Result<Vec<usize>> {
    let dir = match paths.output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = paths.output.file_name().and_then(|n| n.to_str()) else {
        anyhow::bail!("{} is not a file name herd can use", paths.output.display());
    };
    let prefix = format!("{name}.part-");
    let mut parts = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(parts),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let rest = rest.strip_suffix(".state").unwrap_or(rest);
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(k) = rest.parse::<usize>() {
                parts.push(k);
            }
        }
    }
    parts.sort_unstable();
    parts.dedup();
    Ok(parts)
}

/// Call `each(index, error)` for every whole line of a part, in file order; stops at the first
/// torn or unreadable line. The byte length of the whole lines read.
fn read_part(path: &Path, mut each: impl FnMut(u64, bool)) -> Result<(u64, u64)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let total = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut good = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        // A line without its newline, or one that does not parse, is a torn write: stop here.
        let parsed = buf
            .strip_suffix(b"\n")
            .and_then(|l| std::str::from_utf8(l).ok())
            .and_then(parse_part_line)
            .filter(|(_, _, rec)| serde_json::from_str::<serde::de::IgnoredAny>(rec).is_ok());
        let Some((index, err, _)) = parsed else {
            break;
        };
        each(index, err);
        good += n as u64;
    }
    Ok((good, total))
}

/// Cut a torn or unreadable tail off a part (what a kill in the middle of a write leaves); the
/// bytes cut. Only while nobody writes the part (the world leader, before the replicas start).
pub fn cut_torn_tail(path: &Path) -> Result<u64> {
    let (good, total) = read_part(path, |_, _| {})?;
    if good < total {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(good)?;
        f.sync_all()?;
    }
    Ok(total - good)
}

/// What the parts on disk hold, seen by replica `r` of `dp`.
pub struct Scan {
    /// Every record done, in any part.
    pub done: DoneSet,
    /// Done records that replica `r` owns (`index % dp == r`), and how many are error records.
    pub records: u64,
    pub errors: u64,
}

/// Read every part in `parts` (read only: their owners may be appending to them) and note which
/// records are done. Records appended meanwhile are past what an earlier run left, and belong to
/// the other replicas, so this replica's view of its own records is exact.
pub fn scan_parts(paths: &Paths, parts: &[usize], dp: usize, r: usize) -> Result<Scan> {
    let mut scan = Scan {
        done: DoneSet::default(),
        records: 0,
        errors: 0,
    };
    let dp = dp.max(1) as u64;
    for &k in parts {
        read_part(&paths.part(k), |index, err| {
            if scan.done.insert(index) && index % dp == r as u64 {
                scan.records += 1;
                scan.errors += u64::from(err);
            }
        })?;
    }
    Ok(scan)
}

/// World leader, before any replica reads or writes a part: start over (`overwrite`: every
/// part, its state and the output removed), or check every part's state against this run's
/// `identity` (any number of replicas may have made them: done is per record; other settings
/// are refused, exit 2) and cut torn tails; refuse an output this job did not write.
pub fn settle_parts(paths: &Paths, identity: &Value, dp: usize, overwrite: bool) -> Result<()> {
    let usage = crate::exit::Coded::with(crate::exit::USAGE);
    let out = paths.output.display();
    let parts = existing_parts(paths)?;
    if overwrite {
        for &k in &parts {
            let _ = std::fs::remove_file(paths.part(k));
            let _ = std::fs::remove_file(paths.part_state(k));
        }
        let _ = std::fs::remove_file(&paths.output);
        return Ok(());
    }
    let mut worlds = std::collections::BTreeSet::new();
    for &k in &parts {
        let Some(st) = read_state(&paths.part_state(k))? else {
            return Err(usage(anyhow::anyhow!(
                "cannot resume {out}: {} has no state file beside it, so what made it is unknown; \
                 pass --overwrite to start over",
                paths.part(k).display()
            )));
        };
        // The number of replicas does not change a record.
        let diff = identity_diff(&st, identity, &["replicas"]);
        if !diff.is_empty() {
            return Err(usage(anyhow::anyhow!(
                "cannot resume {out}: it was started with other settings ({}); pass --overwrite to start over",
                diff.join("; ")
            )));
        }
        worlds.insert(st["identity"]["replicas"].as_u64().unwrap_or(0));
    }
    if parts.is_empty() && paths.output.exists() {
        return Err(usage(anyhow::anyhow!(
            "{out} exists and was not written by this batch job; pass --overwrite to replace it, or choose another --output"
        )));
    }
    for &k in &parts {
        let cut = cut_torn_tail(&paths.part(k))?;
        if cut > 0 {
            tracing::warn!(
                bytes = cut,
                "dropped a torn last line of {} (an earlier run was killed while writing); it will be redone",
                paths.part(k).display()
            );
        }
    }
    if worlds.iter().any(|&w| w != dp as u64) {
        let was: Vec<String> = worlds.iter().map(u64::to_string).collect();
        eprintln!(
            "batch: resuming with {dp} replicas the parts of a run with {} replicas ({} parts): \
             records already done are kept, the others are shared out anew",
            was.join(" and "),
            parts.len()
        );
    }
    Ok(())
}

/// Appends records to a part: one `write` per record (never a torn line but at a crash).
pub struct PartWriter {
    file: File,
    unsynced: usize,
}

impl PartWriter {
    pub fn open(path: &Path) -> Result<PartWriter> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(PartWriter { file, unsynced: 0 })
    }

    pub fn append(&mut self, index: u64, error: bool, record: &Value) -> Result<()> {
        self.file
            .write_all(part_line(index, error, record).as_bytes())
            .context("writing an output part")?;
        self.unsynced += 1;
        Ok(())
    }

    /// Make what was written survive a machine crash (a killed process loses nothing anyway).
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced > 0 {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }
}

/// The advisory lock on an output: `OUT.lock`, held with flock(2) by the world leader for the
/// whole run, the holder written in it for the message a second run gives. The kernel drops the
/// lock when the process ends, however it ends (kill -9 included): nothing stale is left, and a
/// lock file without a holder is simply taken over. Removed when the run ends.
///
/// Shared file systems: on Linux NFS clients flock is carried out as a POSIX lock on the server
/// (NLM for NFSv3, part of the protocol in v4), so it holds across nodes (unless mounted with
/// `nolock` / `local_lock=flock`: then it holds within one node). Lustre needs the `flock` mount
/// option for that (`localflock`: one node only); without either it refuses locks, and herd
/// warns and runs without one. BeeGFS and GPFS lock across nodes.
pub struct OutputLock {
    file: File,
    path: PathBuf,
}

/// What [`OutputLock::acquire`] found.
pub enum Lock {
    /// This process holds the lock until the value is dropped.
    Held(OutputLock),
    /// Another process holds it; what it wrote about itself ("host H, pid P, ...").
    Busy(String),
    /// The file system does not do locks (the error it gave).
    Unsupported(std::io::Error),
}

impl OutputLock {
    /// Try once, without waiting. `holder` (JSON) is written into the file for others to read.
    pub fn acquire(path: &Path, holder: &Value) -> Result<Lock> {
        let ctx = || format!("locking {}", path.display());
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(ctx)?;
            if let Err(e) = try_flock(&file) {
                return match e.raw_os_error() {
                    Some(libc::EWOULDBLOCK) => {
                        let mut text = String::new();
                        let _ = file.read_to_string(&mut text);
                        Ok(Lock::Busy(describe_holder(&text)))
                    }
                    Some(libc::ENOSYS | libc::ENOLCK | libc::EOPNOTSUPP) => {
                        Ok(Lock::Unsupported(e))
                    }
                    _ => Err(e).with_context(ctx),
                };
            }
            // A holder that just finished removes the file before its lock goes: what we locked
            // may no longer be the file at `path`. Lock the one there.
            if !same_file(&file, path) {
                continue;
            }
            file.set_len(0).with_context(ctx)?;
            file.write_all(format!("{holder}\n").as_bytes())
                .with_context(ctx)?;
            return Ok(Lock::Held(OutputLock {
                file,
                path: path.to_path_buf(),
            }));
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so nobody locks this file after us (see `acquire`).
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.set_len(0);
    }
}

fn try_flock(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this File owns; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// "host H, pid P, Slurm job J, running for 5 min" from a lock file's JSON (what the holder
/// wrote: `host`, `pid`, `slurm_job` when under Slurm, `started` in Unix seconds).
fn describe_holder(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(text.trim()) else {
        return "it has not written its host and pid yet".into();
    };
    let mut s = format!(
        "host {}, pid {}",
        v["host"].as_str().unwrap_or("?"),
        v["pid"]
    );
    if let Some(job) = v["slurm_job"].as_str() {
        s += &format!(", Slurm job {job}");
    }
    if let Some(t) = v["started"].as_u64() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(t, |d| d.as_secs());
        let secs = now.saturating_sub(t);
        s += &if secs < 120 {
            format!(", running for {secs} s")
        } else {
            format!(", running for {} min", secs / 60)
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_lines_round_trip() {
        let rec = json!({"id": "a}", "text": "x"});
        let line = part_line(42, true, &rec);
        let (i, e, r) = parse_part_line(line.trim_end()).unwrap();
        assert_eq!((i, e), (42, true));
        assert_eq!(serde_json::from_str::<Value>(r).unwrap(), rec);
        assert!(parse_part_line("{\"i\":4,\"e\":0,\"r\":{\"id\"").is_none());
    }

    #[test]
    fn the_output_lock_is_exclusive_and_a_free_lock_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl.lock");
        // What a killed holder leaves behind: the file, without the lock.
        std::fs::write(&p, "{\"host\":\"gone\",\"pid\":1}\n").unwrap();
        let me = json!({"host": "h1", "pid": 42, "slurm_job": "7", "started": 0});
        let Lock::Held(held) = OutputLock::acquire(&p, &me).unwrap() else {
            panic!("a lock file nobody holds is free");
        };
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), me);
        // flock belongs to the open file: a second open in the same process is refused too.
        match OutputLock::acquire(&p, &json!({})).unwrap() {
            Lock::Busy(who) => assert!(
                who.starts_with("host h1, pid 42, Slurm job 7, running for"),
                "{who}"
            ),
            _ => panic!("the lock is held"),
        }
        drop(held);
        assert!(!p.exists());
        assert!(matches!(
            OutputLock::acquire(&p, &me).unwrap(),
            Lock::Held(_)
        ));
    }

    #[test]
    fn parts_of_any_world_are_scanned_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.part-0");
        let mut text = part_line(0, false, &json!({"id": 1}));
        text += &part_line(2, true, &json!({"id": 3}));
        let good = text.len() as u64;
        text += "{\"i\":4,\"e\":0,\"r\":{\"id\":";
        std::fs::write(&p, &text).unwrap();
        let paths = Paths {
            output: dir.path().join("o"),
        };
        // A part of an earlier world of 3 replicas: records 1, 4 (one an error) of 2 replicas'.
        std::fs::write(
            paths.part(1),
            part_line(1, false, &json!({})) + &part_line(4, true, &json!({})),
        )
        .unwrap();
        std::fs::write(paths.part_state(7), "{}").unwrap();
        assert_eq!(existing_parts(&paths).unwrap(), vec![0, 1, 7]);
        let s = scan_parts(&paths, &[0, 1], 2, 0).unwrap();
        assert_eq!((s.records, s.errors), (3, 2));
        assert!(s.done.contains(0) && s.done.contains(2) && s.done.contains(1));
        assert!(!s.done.contains(3));
        // Read only: the torn tail stays until the leader cuts it.
        assert!(std::fs::metadata(&p).unwrap().len() > good);
        assert_eq!(cut_torn_tail(&p).unwrap(), text.len() as u64 - good);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), good);
    }
}
