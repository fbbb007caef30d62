//! Device memory for a step's activations and temporaries without an allocation per buffer: one
//! allocation made at start (sized by the memory plan), handed out first-fit and returned when a
//! buffer is dropped. The sequence of requests of a step is the same every time a step of that
//! shape runs, so the addresses are too: a captured decode graph finds its buffers where it left
//! them. A request the arena cannot serve falls back to a stream-ordered allocation (counted).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

/// Every buffer starts on a 256-byte boundary (what cuBLASLt and vector loads like).
pub const ALIGN: usize = 256;

/// Free ranges (offset -> length) of one arena, plus what bench and logs report.
#[derive(Debug, Default)]
pub struct FreeList {
    free: BTreeMap<usize, usize>,
    cap: usize,
    used: usize,
    /// Most bytes in use at once.
    pub peak: usize,
}

impl FreeList {
    pub fn new(cap: usize) -> Self {
        let mut free = BTreeMap::new();
        if cap > 0 {
            free.insert(0, cap);
        }
        FreeList {
            free,
            cap,
            used: 0,
            peak: 0,
        }
    }

    /// The lowest free offset with room for `len` bytes (a multiple of ALIGN).
    pub fn take(&mut self, len: usize) -> Option<usize> {
        let (&off, &flen) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&off);
        if flen > len {
            self.free.insert(off + len, flen - len);
        }
        self.used += len;
        self.peak = self.peak.max(self.used);
        Some(off)
    }

    /// Return `off..off + len`, merged with its free neighbours.
    pub fn give(&mut self, off: usize, len: usize) {
        let (mut start, mut end) = (off, off + len);
        if let Some((&p, &pl)) = self.free.range(..off).next_back() {
            if p + pl == off {
                self.free.remove(&p);
                start = p;
            }
        }
        if let Some(&nl) = self.free.get(&end) {
            self.free.remove(&end);
            end += nl;
        }
        self.free.insert(start, end - start);
        self.used -= len;
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }
}

/// One device allocation handed out in pieces.
pub struct Arena {
    /// Keeps the memory; the pieces are raw addresses inside it.
    _mem: CudaSlice<u8>,
    base: u64,
    list: Arc<Mutex<FreeList>>,
}

impl Arena {
    pub fn new(mem: CudaSlice<u8>, base: u64, cap: usize) -> Self {
        Arena {
            _mem: mem,
            base,
            list: Arc::new(Mutex::new(FreeList::new(cap))),
        }
    }

    /// `bytes` (rounded up to ALIGN) from the arena, or `None` when it has no such range free.
    pub fn take(&self, bytes: usize) -> Option<DevBuf> {
        let len = bytes.max(1).next_multiple_of(ALIGN);
        let off = self.list.lock().ok()?.take(len)?;
        Some(DevBuf {
            ptr: self.base + off as u64,
            bytes,
            own: Own::Arena(self.list.clone(), off, len),
        })
    }

    /// (bytes in use now, most in use at once, capacity).
    pub fn usage(&self) -> (usize, usize, usize) {
        match self.list.lock() {
            Ok(l) => (l.used(), l.peak, l.capacity()),
            Err(_) => (0, 0, 0),
        }
    }
}

enum Own {
    Arena(Arc<Mutex<FreeList>>, usize, usize),
    /// A stream-ordered allocation of its own (no arena, or the arena was full).
    Slice(#[allow(dead_code)] CudaSlice<u8>),
}

/// A device buffer: a piece of the arena or an allocation of its own. `ptr` is what kernels get.
pub struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
    own: Own,
}

impl DevBuf {
    pub fn owned(mem: CudaSlice<u8>, ptr: u64, bytes: usize) -> Self {
        DevBuf {
            ptr,
            bytes,
            own: Own::Slice(mem),
        }
    }

    /// The address `elems` elements of `T` in.
    pub fn at<T>(&self, elems: usize) -> u64 {
        self.ptr + (elems * std::mem::size_of::<T>()) as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if let Own::Arena(list, off, len) = &self.own {
            if let Ok(mut l) = list.lock() {
                l.give(*off, *len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_reuses_and_merges_ranges() {
        let mut l = FreeList::new(1024);
        let a = l.take(256).unwrap();
        let b = l.take(256).unwrap();
        let c = l.take(256).unwrap();
        assert_eq!((a, b, c), (0, 256, 512));
        assert!(l.take(512).is_none());
        l.give(b, 256);
        assert_eq!(l.take(256), Some(256), "the freed hole is reused first");
        l.give(256, 256);
        l.give(a, 256);
        l.give(c, 256);
        assert_eq!(l.used(), 0);
        assert_eq!(l.peak, 768);
        assert_eq!(
            l.take(1024),
            Some(0),
            "everything merged back into one range"
        );
    }

    #[test]
    fn the_same_requests_get_the_same_offsets() {
        // What graph replay relies on: a step of the same shape lands at the same addresses.
        let run = |l: &mut FreeList| {
            let x = l.take(512).unwrap();
            let h = l.take(256).unwrap();
            let q = l.take(768).unwrap();
            l.give(h, 256);
            let o = l.take(256).unwrap();
            l.give(q, 768);
            l.give(o, 256);
            l.give(x, 512);
            (x, h, q, o)
        };
        let mut l = FreeList::new(4096);
        let first = run(&mut l);
        assert_eq!(run(&mut l), first);
    }
}
