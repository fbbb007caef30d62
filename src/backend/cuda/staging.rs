//! One step's host data in one buffer: tokens, positions, KV slots, block tables, row metadata,
//! logit rows, sampling parameters (and masks, when known before the step) are packed into a
//! pinned buffer and sent with a single host-to-device copy; the sampled tokens and log-probs come
//! back in a single copy the other way. A deferred step's sampling rows and masks, computed while
//! its forward runs, go in a buffer of their own ([`SamplingLayout`]).
//! The layout is pure arithmetic over the step's sizes, so that a decode graph of a given batch
//! bucket finds every table at the same device address at every replay.

use crate::backend::{AttnBatch, RowSampling};

/// Regions start on 16-byte boundaries (the sampling rows hold u64s).
const ALIGN: usize = 16;

/// Bytes of one sampling row (struct SampleRow in sample.cu).
pub const SAMPLE_ROW_BYTES: usize = 40;

/// Byte offsets of a step's tables inside the staging buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLayout {
    /// Token rows (padded rows included).
    pub rows: usize,
    /// Logit rows (padded rows included).
    pub logit_rows: usize,
    pub tokens: usize,
    pub positions: usize,
    pub row_table: usize,
    pub row_ctx: usize,
    pub logit_idx: usize,
    pub slots: usize,
    pub params: usize,
    pub tables: usize,
    /// Allowed-token bitmasks of the constrained rows (after the tables: an unconstrained step
    /// sends no byte more; the kernel finds each row's mask by its word offset from the buffer's
    /// start, which a graph's replay reads from the uploaded row, not from its captured args).
    pub masks: usize,
    /// Bytes used.
    pub end: usize,
}

fn up(x: usize) -> usize {
    x.next_multiple_of(ALIGN)
}

impl StepLayout {
    /// Fixed-size regions first (they depend only on the row counts), then the block tables
    /// (`tables` entries, the one shared padding entry included), then `mask_words` u32 words of
    /// masks.
    pub fn new(rows: usize, logit_rows: usize, tables: usize, mask_words: usize) -> Self {
        let tokens = 0;
        let positions = up(tokens + 4 * rows);
        let row_table = up(positions + 4 * rows);
        let row_ctx = up(row_table + 4 * rows);
        let logit_idx = up(row_ctx + 4 * rows);
        let slots = up(logit_idx + 4 * logit_rows);
        let params = up(slots + 8 * rows);
        let tables_at = up(params + SAMPLE_ROW_BYTES * logit_rows);
        let masks = up(tables_at + 4 * tables);
        StepLayout {
            rows,
            logit_rows,
            tokens,
            positions,
            row_table,
            row_ctx,
            logit_idx,
            slots,
            params,
            tables: tables_at,
            masks,
            end: up(masks + 4 * mask_words),
        }
    }
}

/// Where the sampled results sit in the output buffer: `[token u32 × L][log-prob f32 × L]
/// [top ids u32 × L·top][top log-probs f32 × L·top]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutLayout {
    pub rows: usize,
    pub top: usize,
}

impl OutLayout {
    pub fn token(&self) -> usize {
        0
    }
    pub fn logprob(&self) -> usize {
        4 * self.rows
    }
    pub fn top_id(&self) -> usize {
        8 * self.rows
    }
    pub fn top_lp(&self) -> usize {
        8 * self.rows + 4 * self.rows * self.top
    }
    pub fn end(&self) -> usize {
        8 * self.rows + 8 * self.rows * self.top
    }
}

/// What a step stages: its rows padded to `pad_rows` (masked: they write no KV, attend to one
/// position of block 0 and sample greedily; their results are never read).
pub struct StepData<'a> {
    pub tokens: &'a [u32],
    pub batch: &'a AttnBatch,
    pub logit_rows: &'a [usize],
    pub sampling: Option<&'a [RowSampling<'a>]>,
    pub block_size: usize,
    pub pad_rows: usize,
    pub pad_logit_rows: usize,
}

impl StepData<'_> {
    pub fn layout(&self) -> StepLayout {
        let tables: usize = self.batch.seqs.iter().map(|s| s.block_table.len()).sum();
        let mask_words = self.sampling.map_or(0, |rows| {
            rows.iter().filter_map(|r| r.mask).map(<[u32]>::len).sum()
        });
        StepLayout::new(
            self.pad_rows.max(self.tokens.len()),
            self.pad_logit_rows.max(self.logit_rows.len()),
            tables + 1,
            mask_words,
        )
    }

    /// Write everything into `buf` (at least `layout().end` bytes).
    pub fn pack(&self, l: &StepLayout, buf: &mut [u8]) {
        fn put<const N: usize>(buf: &mut [u8], at: usize, i: usize, v: [u8; N]) {
            buf[at + N * i..at + N * (i + 1)].copy_from_slice(&v);
        }
        let n = self.tokens.len();
        // Block tables; the last entry (block 0) is the padding rows' one.
        let mut t = 0;
        let mut row = 0;
        for s in &self.batch.seqs {
            let off = t as u32;
            for &b in &s.block_table {
                put(buf, l.tables, t, b.to_le_bytes());
                t += 1;
            }
            for j in 0..s.n_tokens {
                let pos = s.position(j);
                let blk = s
                    .block_table
                    .get(pos / self.block_size)
                    .copied()
                    .unwrap_or(0) as i64;
                let slot = blk * self.block_size as i64 + (pos % self.block_size) as i64;
                put(buf, l.slots, row, slot.to_le_bytes());
                put(buf, l.row_table, row, off.to_le_bytes());
                row += 1;
            }
        }
        let pad_table = t as u32;
        put(buf, l.tables, t, 0u32.to_le_bytes());
        for (i, &tok) in self.tokens.iter().enumerate() {
            let pos = self.batch.positions.get(i).copied().unwrap_or(0);
            put(buf, l.tokens, i, tok.to_le_bytes());
            put(buf, l.positions, i, pos.to_le_bytes());
            put(buf, l.row_ctx, i, (pos + 1).to_le_bytes());
        }
        for i in n..l.rows {
            put(buf, l.tokens, i, 0u32.to_le_bytes());
            put(buf, l.positions, i, 0u32.to_le_bytes());
            put(buf, l.row_ctx, i, 1u32.to_le_bytes());
            put(buf, l.row_table, i, pad_table.to_le_bytes());
            put(buf, l.slots, i, (-1i64).to_le_bytes());
        }
        let mut mask_at = l.masks;
        for i in 0..l.logit_rows {
            // Padded logit rows take the padded token rows (rows >= n) in order.
            let r = self
                .logit_rows
                .get(i)
                .copied()
                .unwrap_or_else(|| n + i - self.logit_rows.len());
            put(
                buf,
                l.logit_idx,
                i,
                (r.min(l.rows.saturating_sub(1)) as u32).to_le_bytes(),
            );
            let p = self.sampling.and_then(|s| s.get(i));
            // The mask: its words after the tables, found by word offset; none = all allowed.
            let row = sample_row(p, buf, &mut mask_at);
            put(buf, l.params, i, row);
        }
    }
}

/// One sampling row (struct SampleRow in sample.cu; `None`: a padded row, greedy), its mask's
/// words written into `buf` at byte `mask_at` (advanced past them), which the kernel finds by
/// word offset from the start of `buf` (its `stage` argument).
fn sample_row(
    p: Option<&RowSampling>,
    buf: &mut [u8],
    mask_at: &mut usize,
) -> [u8; SAMPLE_ROW_BYTES] {
    let mut row = [0u8; SAMPLE_ROW_BYTES];
    let (temp, top_p, top_k, n_top, seed, gen) = match p {
        Some(p) => (
            p.temperature,
            p.top_p,
            p.top_k.min(u32::MAX as usize) as u32,
            p.top_logprobs as u32,
            p.seed,
            p.n,
        ),
        None => (0.0, 1.0, 0, 0, 0, 0),
    };
    row[0..4].copy_from_slice(&temp.to_le_bytes());
    row[4..8].copy_from_slice(&top_p.to_le_bytes());
    row[8..12].copy_from_slice(&top_k.to_le_bytes());
    row[12..16].copy_from_slice(&n_top.to_le_bytes());
    row[16..24].copy_from_slice(&seed.to_le_bytes());
    row[24..32].copy_from_slice(&gen.to_le_bytes());
    if let Some(m) = p.and_then(|p| p.mask) {
        let at = *mask_at;
        for (w, &word) in m.iter().enumerate() {
            buf[at + 4 * w..at + 4 * w + 4].copy_from_slice(&word.to_le_bytes());
        }
        row[32..36].copy_from_slice(&((at / 4) as u32).to_le_bytes());
        row[36..40].copy_from_slice(&(m.len() as u32).to_le_bytes());
        *mask_at += 4 * m.len();
    }
    row
}

/// A deferred step's sampling, sent once its forward runs (structured outputs: the masks are
/// computed meanwhile): `rows` sampling rows (the padded ones greedy and unmasked), then the
/// masks, in a buffer of their own whose start is the kernel's `params` and `stage` both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplingLayout {
    pub rows: usize,
    pub masks: usize,
    /// Bytes used.
    pub end: usize,
}

impl SamplingLayout {
    /// For `sampling` padded to `pad_rows` rows.
    pub fn new(sampling: &[RowSampling], pad_rows: usize) -> Self {
        let rows = pad_rows.max(sampling.len());
        let words: usize = sampling
            .iter()
            .filter_map(|r| r.mask)
            .map(<[u32]>::len)
            .sum();
        let masks = up(SAMPLE_ROW_BYTES * rows);
        SamplingLayout {
            rows,
            masks,
            end: up(masks + 4 * words),
        }
    }

    /// Write the rows and their masks into `buf` (at least `end` bytes).
    pub fn pack(&self, sampling: &[RowSampling], buf: &mut [u8]) {
        let mut mask_at = self.masks;
        for i in 0..self.rows {
            let row = sample_row(sampling.get(i), buf, &mut mask_at);
            buf[SAMPLE_ROW_BYTES * i..SAMPLE_ROW_BYTES * (i + 1)].copy_from_slice(&row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqSpan;

    fn u32_at(b: &[u8], at: usize, i: usize) -> u32 {
        u32::from_le_bytes(b[at + 4 * i..at + 4 * i + 4].try_into().unwrap())
    }
    fn i64_at(b: &[u8], at: usize, i: usize) -> i64 {
        i64::from_le_bytes(b[at + 8 * i..at + 8 * i + 8].try_into().unwrap())
    }

    #[test]
    fn a_padded_decode_step_packs_real_rows_then_masked_ones() {
        let batch = AttnBatch::new(vec![
            SeqSpan {
                token_start: 0,
                n_tokens: 1,
                context_len: 18,
                block_table: vec![7, 3],
            },
            SeqSpan {
                token_start: 1,
                n_tokens: 1,
                context_len: 5,
                block_table: vec![9],
            },
        ]);
        let rows = [RowSampling {
            temperature: 0.5,
            top_p: 0.9,
            top_k: 40,
            seed: 77,
            n: 3,
            top_logprobs: 2,
            mask: None,
        }; 2];
        let d = StepData {
            tokens: &[11, 12],
            batch: &batch,
            logit_rows: &[0, 1],
            sampling: Some(&rows),
            block_size: 16,
            pad_rows: 4,
            pad_logit_rows: 4,
        };
        let l = d.layout();
        assert_eq!((l.rows, l.logit_rows), (4, 4));
        // The fixed regions do not depend on the tables: a graph of 4 rows always finds them.
        assert_eq!(StepLayout::new(4, 4, 100, 0).params, l.params);
        assert_eq!(l.end, l.masks, "no mask, no mask bytes");
        let mut b = vec![0u8; l.end];
        d.pack(&l, &mut b);
        assert_eq!(u32_at(&b, l.tokens, 1), 12);
        assert_eq!(u32_at(&b, l.positions, 0), 17);
        assert_eq!(u32_at(&b, l.row_ctx, 0), 18);
        assert_eq!(i64_at(&b, l.slots, 0), 3 * 16 + 1);
        assert_eq!(i64_at(&b, l.slots, 1), 9 * 16 + 4);
        assert_eq!(i64_at(&b, l.slots, 2), -1, "padding rows write no KV");
        assert_eq!(u32_at(&b, l.row_table, 1), 2);
        assert_eq!(
            u32_at(&b, l.row_table, 3),
            3,
            "padding rows share the last entry"
        );
        assert_eq!(u32_at(&b, l.tables, 3), 0);
        assert_eq!(u32_at(&b, l.row_ctx, 3), 1);
        assert_eq!(
            (0..4)
                .map(|i| u32_at(&b, l.logit_idx, i))
                .collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(u32_at(&b, l.params + 8, 0), 40);
        assert_eq!(u32_at(&b, l.params + 12, 0), 2);
        assert_eq!(u32_at(&b, l.params + SAMPLE_ROW_BYTES * 3 + 12, 0), 0);
        assert_eq!(
            u32_at(&b, l.params + 36, 0),
            0,
            "unconstrained: no mask words"
        );
    }

    #[test]
    fn a_constrained_row_sends_its_mask_after_the_tables() {
        let batch = AttnBatch::new(vec![
            SeqSpan {
                token_start: 0,
                n_tokens: 1,
                context_len: 3,
                block_table: vec![1],
            },
            SeqSpan {
                token_start: 1,
                n_tokens: 1,
                context_len: 3,
                block_table: vec![2],
            },
        ]);
        let words = [0b1010u32, 0, 1 << 31];
        let plain = RowSampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 1,
            n: 0,
            top_logprobs: 0,
            mask: None,
        };
        let rows = [
            plain,
            RowSampling {
                mask: Some(&words),
                ..plain
            },
        ];
        let d = StepData {
            tokens: &[5, 6],
            batch: &batch,
            logit_rows: &[0, 1],
            sampling: Some(&rows),
            block_size: 16,
            pad_rows: 4,
            pad_logit_rows: 4,
        };
        let l = d.layout();
        // The fixed regions sit where an unconstrained step of 4 rows has them (the graph's).
        let free = StepLayout::new(4, 4, 3, 0);
        assert_eq!(
            (l.params, l.tables, l.masks),
            (free.params, free.tables, free.masks)
        );
        assert_eq!(l.end, l.masks + 16);
        let mut b = vec![0u8; l.end];
        d.pack(&l, &mut b);
        assert_eq!(u32_at(&b, l.params + 36, 0), 0);
        let row1 = l.params + SAMPLE_ROW_BYTES;
        let off = u32_at(&b, row1 + 32, 0) as usize;
        assert_eq!(off * 4, l.masks);
        assert_eq!(u32_at(&b, row1 + 36, 0), 3);
        assert_eq!(
            (0..3).map(|w| u32_at(&b, 4 * off, w)).collect::<Vec<_>>(),
            words
        );
    }

    #[test]
    fn a_deferred_steps_sampling_rows_and_masks_share_one_buffer() {
        let words = [7u32, 0, 1 << 5];
        let plain = RowSampling {
            temperature: 0.8,
            top_p: 1.0,
            top_k: 5,
            seed: 9,
            n: 4,
            top_logprobs: 1,
            mask: None,
        };
        let rows = [
            RowSampling {
                mask: Some(&words),
                ..plain
            },
            plain,
            RowSampling {
                mask: Some(&words[..2]),
                ..plain
            },
        ];
        // Padded to the graph's 4 rows: the fourth is greedy and unmasked.
        let l = SamplingLayout::new(&rows, 4);
        assert_eq!(l.rows, 4);
        assert_eq!(l.masks, (4 * SAMPLE_ROW_BYTES).next_multiple_of(ALIGN));
        assert_eq!(l.end, (l.masks + 4 * 5).next_multiple_of(ALIGN));
        let mut b = vec![0xAAu8; l.end];
        l.pack(&rows, &mut b);
        let row = |i: usize| SAMPLE_ROW_BYTES * i;
        assert_eq!(u32_at(&b, row(0) + 8, 0), 5, "top_k");
        // Mask offsets count words from the buffer's start (the kernel's `stage`).
        assert_eq!(u32_at(&b, row(0) + 32, 0) as usize * 4, l.masks);
        assert_eq!(u32_at(&b, row(0) + 36, 0), 3);
        assert_eq!(u32_at(&b, row(1) + 36, 0), 0, "unconstrained row: no mask");
        assert_eq!(u32_at(&b, row(2) + 32, 0) as usize * 4, l.masks + 12);
        assert_eq!(u32_at(&b, row(2) + 36, 0), 2);
        assert_eq!(
            (0..5).map(|w| u32_at(&b, l.masks, w)).collect::<Vec<_>>(),
            [7, 0, 1 << 5, 7, 0]
        );
        assert_eq!(u32_at(&b, row(3), 0), 0, "padded row: temperature 0");
        assert_eq!(u32_at(&b, row(3) + 36, 0), 0);
    }
}
