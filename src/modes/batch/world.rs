//! Which world batch mode runs in: the launcher's (MPI or one process) or — for tests of the
//! part-file and merge path without MPI — a world of separate processes that meet at a barrier
//! of files: `HERD_BATCH_TEST_WORLD=RANK,SIZE,DIR` (hidden, testing only).

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use crate::parallel::{CommError, Topology, World};

/// Environment variable of the testing world.
pub const TEST_WORLD_ENV: &str = "HERD_BATCH_TEST_WORLD";

/// Ranks that are separate processes (tp = 1); `barrier` waits for one file per rank in `dir`.
pub struct FileWorld {
    topo: Topology,
    dir: PathBuf,
}

impl World for FileWorld {
    fn topology(&self) -> &Topology {
        &self.topo
    }
    fn barrier(&self) -> Result<(), CommError> {
        let rank = self.topo.world_rank;
        let fail = |msg: String| CommError::Failed { rank, msg };
        std::fs::write(self.dir.join(format!("arrived-{rank}")), b"")
            .map_err(|e| fail(e.to_string()))?;
        // Polling is fine here: this world exists only for tests.
        loop {
            let all =
                (0..self.topo.world_size).all(|r| self.dir.join(format!("arrived-{r}")).exists());
            if all {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
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
        dir: PathBuf::from(dir),
    }))
}
