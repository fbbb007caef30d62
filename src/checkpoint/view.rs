//! Strided views into a mapped file, and turning them into row-major [`Tensor`]s.
//!
//! Readers validate a view's whole byte extent once when they build it; narrowing only shrinks
//! it, so the copies here never index outside the map.

use super::{Bytes, DType, Tensor};
use std::sync::Arc;

/// A strided view of elements in a mapped file (strides in elements, all non-negative).
#[derive(Clone)]
pub(crate) struct View {
    pub map: Arc<memmap2::Mmap>,
    /// Byte offset of element `[0, 0, ...]`.
    pub offset: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// Row-major strides of `shape`.
pub(crate) fn row_major(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    // Saturating: a shape with a zero dimension holds nothing, whatever its other sizes.
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(shape[i + 1]);
    }
    s
}

/// Checks that a view with this layout stays inside `avail` elements; returns the number of
/// elements it spans. Errors are messages for the caller to wrap.
pub(crate) fn extent(
    offset: usize,
    shape: &[usize],
    strides: &[usize],
    avail: usize,
) -> Result<usize, String> {
    if shape.contains(&0) {
        if offset > avail {
            return Err(format!(
                "offset {offset} is past the end of the storage ({avail} elements)"
            ));
        }
        return Ok(0);
    }
    let mut last = offset;
    for (&n, &s) in shape.iter().zip(strides) {
        last = (n - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or("size/stride overflow")?;
    }
    if last >= avail {
        return Err(format!(
            "elements up to index {last} are needed but the storage holds {avail}"
        ));
    }
    Ok(last + 1)
}

impl View {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Restricts dimension `dim` to `start..start + len`; the caller has checked the bounds.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> View {
        debug_assert!(start + len <= self.shape[dim]);
        let mut v = self.clone();
        // An empty view's strides were never checked against the storage: leave its offset.
        if len > 0 && self.numel() > 0 {
            v.offset += start * self.strides[dim] * self.dtype.size();
        }
        v.shape[dim] = len;
        v
    }

    pub fn is_contiguous(&self) -> bool {
        let want = row_major(&self.shape);
        self.shape
            .iter()
            .zip(self.strides.iter().zip(&want))
            .all(|(&n, (&s, &w))| n <= 1 || s == w)
    }

    /// Appends the view's elements in row-major order.
    pub fn gather_into(&self, out: &mut Vec<u8>) {
        let es = self.dtype.size();
        if self.numel() == 0 {
            return;
        }
        // The longest suffix of dims laid out row-major is copied as one block.
        let rank = self.shape.len();
        let mut k = rank;
        let mut block = 1usize;
        while k > 0 && (self.shape[k - 1] == 1 || self.strides[k - 1] == block) {
            block *= self.shape[k - 1];
            k -= 1;
        }
        let block_bytes = block * es;
        let mut idx = vec![0usize; k];
        out.reserve(self.numel() * es);
        loop {
            let mut off = self.offset;
            for (d, &i) in idx.iter().enumerate() {
                off += i * self.strides[d] * es;
            }
            out.extend_from_slice(&self.map[off..off + block_bytes]);
            // Odometer over the leading k dims.
            let mut d = k;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }

    /// The view as a tensor: zero-copy when contiguous, gathered otherwise.
    pub fn to_tensor(&self) -> Tensor {
        let bytes = if self.is_contiguous() {
            Bytes::Mapped {
                map: self.map.clone(),
                offset: self.offset,
                len: self.numel() * self.dtype.size(),
            }
        } else {
            let mut v = Vec::new();
            self.gather_into(&mut v);
            Bytes::Owned(Arc::new(v))
        };
        Tensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            bytes,
        }
    }
}

/// Concatenates views along `dim` into one row-major tensor. All parts share dtype, rank and
/// every dimension but `dim` (checked by the caller). A single part stays zero-copy if it can.
pub(crate) fn concat(parts: &[View], dim: usize) -> Tensor {
    if parts.len() == 1 {
        return parts[0].to_tensor();
    }
    let first = &parts[0];
    let mut shape = first.shape.clone();
    shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * first.dtype.size());
    if numel > 0 {
        // For each index over the leading dims, append each part's slab in turn.
        let lead = &shape[..dim];
        let mut idx = vec![0usize; dim];
        'outer: loop {
            for p in parts {
                let mut v = p.clone();
                for (d, &i) in idx.iter().enumerate() {
                    v = v.narrow(d, i, 1);
                }
                v.gather_into(&mut out);
            }
            let mut d = dim;
            loop {
                if d == 0 {
                    break 'outer;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < lead[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    Tensor {
        dtype: first.dtype,
        shape,
        bytes: Bytes::Owned(Arc::new(out)),
    }
}
