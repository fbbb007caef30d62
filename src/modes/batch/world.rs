//! Which world batch mode runs in: the launcher's (MPI or one process) or — for tests of the
//! part-file and merge path without MPI — a world of separate processes whose collectives go
//! through files: `HERD_BATCH_TEST_WORLD=RANK,SIZE,DIR` (hidden, testing only).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::parallel::{CommError, HostComm, Topology, World};

/// Environment variable of the testing world.
pub const TEST_WORLD_ENV: &str = "HERD_BATCH_TEST_WORLD";

/// Ranks that are separate processes (tp = 1) meeting in a directory.
pub struct FileWorld {
    topo: Topology,
    comm: Arc<FileComm>,
}

impl World for FileWorld {
    fn topology(&self) -> &Topology {
        &self.topo
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.comm.exchange(Vec::new()).map(drop)
    }
    fn world_comm(&self) -> Arc<dyn HostComm> {
        self.comm.clone()
    }
}

/// The world's collectives over files: the n-th collective call of rank r writes `c{n}-{r}`
/// (atomically, by rename) and reads every rank's. Polling is fine: this world exists for tests.
pub struct FileComm {
    rank: usize,
    size: usize,
    dir: PathBuf,
    calls: AtomicU64,
}

impl FileComm {
    fn file(&self, call: u64, rank: usize) -> PathBuf {
        self.dir.join(format!("c{call}-{rank}"))
    }

    fn fail(&self, msg: String) -> CommError {
        CommError::Failed {
            rank: self.rank,
            msg,
        }
    }

    fn publish(&self, call: u64, bytes: &[u8]) -> Result<(), CommError> {
        let tmp = self.dir.join(format!("tmp-c{call}-{}", self.rank));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, self.file(call, self.rank)))
            .map_err(|e| self.fail(format!("{}: {e}", self.dir.display())))
    }

    fn read(&self, call: u64, rank: usize) -> Result<Vec<u8>, CommError> {
        let path = self.file(call, rank);
        loop {
            match std::fs::read(&path) {
                Ok(b) => return Ok(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(self.fail(format!("{}: {e}", path.display()))),
            }
        }
    }

    /// Every rank's bytes, in rank order (waits for all of them).
    fn exchange(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        self.publish(call, &mine)?;
        (0..self.size).map(|r| self.read(call, r)).collect()
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl HostComm for FileComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CommError> {
        let all = self.all_gather(x)?;
        let n = x.len().max(1);
        for (i, v) in x.iter_mut().enumerate() {
            *v = all.iter().skip(i).step_by(n).sum();
        }
        Ok(())
    }
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(self
            .exchange(bytes(x))?
            .iter()
            .flat_map(|b| f32s(b))
            .collect())
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CommError> {
        // Only the root writes; the others read its file (the root never waits).
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.rank == root {
            self.publish(call, buf)
        } else {
            *buf = self.read(call, root)?;
            Ok(())
        }
    }
}

/// The world this process belongs to: the launcher's (MPI, or one process), split into
/// replicas of `tp` ranks.
pub fn current(tp: usize) -> Result<Arc<dyn World>, String> {
    let Ok(spec) = std::env::var(TEST_WORLD_ENV) else {
        return crate::parallel::cluster().world(tp);
    };
    let parts: Vec<&str> = spec.splitn(3, ',').collect();
    let bad = || format!("{TEST_WORLD_ENV} must be RANK,SIZE,DIR, got {spec:?}");
    let [rank, size, dir] = parts.as_slice() else {
        return Err(bad());
    };
    let rank: usize = rank.parse().map_err(|_| bad())?;
    let size: usize = size.parse().map_err(|_| bad())?;
    if rank >= size {
        return Err(bad());
    }
    let topo = Topology::new(rank, size, 1, rank)?;
    Ok(Arc::new(FileWorld {
        topo,
        comm: Arc::new(FileComm {
            rank,
            size,
            dir: PathBuf::from(dir),
            calls: AtomicU64::new(0),
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_collectives_agree_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let worlds: Vec<FileComm> = (0..3)
            .map(|rank| FileComm {
                rank,
                size: 3,
                dir: dir.path().to_path_buf(),
                calls: AtomicU64::new(0),
            })
            .collect();
        std::thread::scope(|s| {
            for c in &worlds {
                s.spawn(move || {
                    let r = c.rank as f32;
                    assert_eq!(
                        c.all_gather(&[r, 10.0]).unwrap(),
                        [0., 10., 1., 10., 2., 10.]
                    );
                    let mut x = [r, 1.0];
                    c.all_reduce_sum(&mut x).unwrap();
                    assert_eq!(x, [3.0, 3.0]);
                    let mut b = if c.rank == 1 { b"one".to_vec() } else { vec![] };
                    c.broadcast_bytes(1, &mut b).unwrap();
                    assert_eq!(b, b"one");
                });
            }
        });
    }
}
