//! The tensor-parallel step protocol. The replica leader runs the engine; before each forward it
//! broadcasts the step plan to its peers, which run the same forward on their shard and nothing
//! else. Shutdown is a message, so followers never hang on a leader that is done.

use std::sync::Arc;

use super::{ModelError, ModelRunner, SeqSpan, StepInput};
use crate::backend::KvShape;
use crate::parallel::HostComm;

/// What the leader sends each step.
#[derive(Clone, Debug)]
pub enum StepMsg {
    Step(StepInput),
    Shutdown,
}

const KIND_STEP: u8 = 1;
const KIND_SHUTDOWN: u8 = 2;

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Little-endian u64 fields: kind, then lengths followed by their elements.
pub fn encode(msg: &StepMsg, out: &mut Vec<u8>) {
    out.clear();
    let StepMsg::Step(s) = msg else {
        out.push(KIND_SHUTDOWN);
        return;
    };
    out.push(KIND_STEP);
    put(out, s.tokens.len() as u64);
    for &t in &s.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    put(out, s.seqs.len() as u64);
    for q in &s.seqs {
        put(out, q.token_start as u64);
        put(out, q.n_tokens as u64);
        put(out, q.context_len as u64);
        put(out, q.block_table.len() as u64);
        for &b in &q.block_table {
            out.extend_from_slice(&b.to_le_bytes());
        }
    }
    put(out, s.logit_rows.len() as u64);
    for &r in &s.logit_rows {
        put(out, r as u64);
    }
    put(out, s.kv_copies.len() as u64);
    for &(a, b) in &s.kv_copies {
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        if self.0.len() < N {
            return Err(ModelError::Backend("truncated step message".into()));
        }
        let (a, b) = self.0.split_at(N);
        self.0 = b;
        let mut x = [0u8; N];
        x.copy_from_slice(a);
        Ok(x)
    }
    fn u64(&mut self) -> Result<usize, ModelError> {
        usize::try_from(u64::from_le_bytes(self.take()?))
            .map_err(|_| ModelError::Backend("step message field too large".into()))
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    /// A count, bounded by the bytes left so a corrupt message cannot allocate wildly.
    fn count(&mut self, elem: usize) -> Result<usize, ModelError> {
        let n = self.u64()?;
        if n.saturating_mul(elem) > self.0.len() {
            return Err(ModelError::Backend("corrupt step message".into()));
        }
        Ok(n)
    }
}

pub fn decode(bytes: &[u8]) -> Result<StepMsg, ModelError> {
    let mut r = Reader(bytes);
    match r.take::<1>()?[0] {
        KIND_SHUTDOWN => return Ok(StepMsg::Shutdown),
        KIND_STEP => {}
        k => {
            return Err(ModelError::Backend(format!(
                "unknown step message kind {k}"
            )))
        }
    }
    let n = r.count(4)?;
    let tokens = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
    let n = r.count(32)?;
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        let token_start = r.u64()?;
        let n_tokens = r.u64()?;
        let context_len = r.u64()?;
        let nb = r.count(4)?;
        let block_table = (0..nb).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
        seqs.push(SeqSpan {
            token_start,
            n_tokens,
            context_len,
            block_table,
        });
    }
    let n = r.count(8)?;
    let logit_rows = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
    let n = r.count(8)?;
    let kv_copies = (0..n)
        .map(|_| Ok((r.u32()?, r.u32()?)))
        .collect::<Result<Vec<_>, ModelError>>()?;
    Ok(StepMsg::Step(StepInput {
        tokens,
        seqs,
        logit_rows,
        kv_copies,
    }))
}

/// What the watchdog calls a step's forward on a tensor-parallel rank: its collectives (host
/// collectives are watched one by one too; NCCL's run on the GPU, where only this sees them).
const STEP_COLLECTIVES: &str = "a step's forward (its NCCL collectives on the GPU)";

/// The replica leader's model: broadcasts each step plan, then runs its own shard's forward.
pub struct TpLeader {
    inner: Box<dyn ModelRunner>,
    comm: Arc<dyn HostComm>,
    buf: Vec<u8>,
}

impl TpLeader {
    pub fn new(inner: Box<dyn ModelRunner>, comm: Arc<dyn HostComm>) -> Self {
        TpLeader {
            inner,
            comm,
            buf: Vec::new(),
        }
    }
}

impl ModelRunner for TpLeader {
    fn config(&self) -> &super::LlamaConfig {
        self.inner.config()
    }
    fn kv_shape(&self) -> KvShape {
        self.inner.kv_shape()
    }
    fn backend_name(&self) -> String {
        format!("{} x tp {}", self.inner.backend_name(), self.comm.size())
    }
    fn forward(&mut self, step: &StepInput) -> Result<Vec<f32>, ModelError> {
        // Plans are small (tokens + block tables), a few KB even for big batches.
        encode(&StepMsg::Step(step.clone()), &mut self.buf);
        self.comm
            .broadcast_bytes(0, &mut self.buf)
            .map_err(|e| ModelError::Backend(e.to_string()))?;
        let _wait = self.comm.watch(STEP_COLLECTIVES);
        self.inner.forward(step)
    }
}

impl Drop for TpLeader {
    fn drop(&mut self) {
        encode(&StepMsg::Shutdown, &mut self.buf);
        // Nothing to do about a failure here: the job is ending either way.
        let _ = self.comm.broadcast_bytes(0, &mut self.buf);
    }
}

/// A follower's loop: run every step the leader sends until it says shutdown; the number of steps.
///
/// A step the model rejects as bad input (a token outside the vocabulary) fails identically on the
/// leader, which reports it; the follower just waits for the next one.
pub fn follow(
    model: &mut dyn ModelRunner,
    comm: &dyn HostComm,
    mut before_step: impl FnMut(u64) -> Result<(), String>,
) -> Result<u64, ModelError> {
    let mut buf = Vec::new();
    let mut steps = 0u64;
    loop {
        comm.broadcast_bytes(0, &mut buf)
            .map_err(|e| ModelError::Backend(e.to_string()))?;
        match decode(&buf)? {
            StepMsg::Shutdown => return Ok(steps),
            StepMsg::Step(step) => {
                before_step(steps).map_err(ModelError::Backend)?;
                let _wait = comm.watch(STEP_COLLECTIVES);
                match model.forward(&step) {
                    Ok(_) | Err(ModelError::Input(_)) => {}
                    Err(e) => return Err(e),
                }
                steps += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_messages_round_trip() {
        let s = StepInput {
            tokens: vec![1, 2, 128000],
            seqs: vec![
                SeqSpan {
                    token_start: 0,
                    n_tokens: 2,
                    context_len: 7,
                    block_table: vec![3, 9],
                },
                SeqSpan {
                    token_start: 2,
                    n_tokens: 1,
                    context_len: 1,
                    block_table: vec![0],
                },
            ],
            logit_rows: vec![1, 2],
            kv_copies: vec![(4, 5), (6, 7)],
        };
        let mut buf = Vec::new();
        encode(&StepMsg::Step(s.clone()), &mut buf);
        let StepMsg::Step(d) = decode(&buf).unwrap() else {
            panic!("not a step")
        };
        assert_eq!(d.tokens, s.tokens);
        assert_eq!(d.logit_rows, s.logit_rows);
        assert_eq!(d.kv_copies, s.kv_copies);
        assert_eq!(d.seqs.len(), 2);
        assert_eq!(d.seqs[0].block_table, vec![3, 9]);
        assert_eq!(d.seqs[1].context_len, 1);
        encode(&StepMsg::Shutdown, &mut buf);
        assert!(matches!(decode(&buf).unwrap(), StepMsg::Shutdown));
        assert!(decode(&buf[..0]).is_err());
        assert!(decode(&[KIND_STEP, 255, 255, 255, 255, 255, 255, 255, 255]).is_err());
    }
}
