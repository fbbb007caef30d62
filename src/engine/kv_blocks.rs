//! The pool of KV cache blocks, with automatic prefix caching.
//!
//! Sequences own block tables of reference-counted block ids. A block that a sequence has filled
//! completely is *registered*: found again by a hash chained on its parent block's hash and its
//! token ids (seeded with a salt for everything else that changes its contents: model, rank
//! layout, KV dtype). A hash alone never serves KV: a hit is confirmed by comparing the block's
//! token ids and its parent's identity, so by induction the whole prefix matches exactly.
//!
//! A registered block whose count drops to zero keeps its contents and stays findable ("cached")
//! until the pool needs it for new work: empty blocks go first, then cached ones, least recently
//! released first (a table is released tail first, so a finished sequence's last blocks go first).
//! Every block is exactly one of: in use (count > 0), free (empty), cached (count 0, findable).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// The identity of a registered block's contents: its id and the registration it belongs to.
/// A block reused for other contents gets a new serial, so a stale identity never matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockKey {
    pub block: u32,
    serial: u64,
}

/// What a registered block holds.
#[derive(Debug)]
struct Entry {
    hash: u64,
    serial: u64,
    /// The registered block before this one in the sequence (None: the first block).
    parent: Option<BlockKey>,
    tokens: Vec<u32>,
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    total: usize,
    /// Empty blocks (no findable contents), popped from the end.
    free: Vec<u32>,
    refs: Vec<u32>,
    entries: Vec<Option<Entry>>,
    by_hash: HashMap<u64, u32>,
    /// Cached blocks (count 0, registered) by release tick: the smallest is evicted first.
    lru: BTreeMap<u64, u32>,
    lru_tick: Vec<u64>,
    tick: u64,
    next_serial: u64,
    salt: u64,
}

impl BlockPool {
    pub fn new(total: usize, block_size: usize) -> Self {
        Self::with_salt(total, block_size, 0)
    }

    /// A pool whose block hashes start from `salt` (what else decides a block's contents).
    pub fn with_salt(total: usize, block_size: usize, salt: u64) -> Self {
        // Hand out low ids first (pop from the end).
        BlockPool {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            entries: (0..total).map(|_| None).collect(),
            by_hash: HashMap::new(),
            lru: BTreeMap::new(),
            lru_tick: vec![0; total],
            tick: 0,
            next_serial: 1,
            salt,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn total(&self) -> usize {
        self.total
    }
    /// Empty blocks.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }
    /// Blocks nobody uses that keep findable contents.
    pub fn cached_count(&self) -> usize {
        self.lru.len()
    }
    /// Blocks a new allocation may take (empty, then cached).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The hash of a full block of `tokens` after the block hashed `parent` (None: the first).
    pub fn block_hash(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.unwrap_or(self.salt).hash(&mut h);
        parent.is_none().hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// Chained hashes of the full blocks of `tokens`, extending `hashes` (already computed
    /// ones are kept).
    pub fn extend_hashes(&self, hashes: &mut Vec<u64>, tokens: &[u32]) {
        let bs = self.block_size;
        for k in hashes.len()..tokens.len() / bs {
            let h = self.block_hash(hashes.last().copied(), &tokens[k * bs..(k + 1) * bs]);
            hashes.push(h);
        }
    }

    /// Take one block for new contents: an empty one, else the least recently released cached one.
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                self.forget(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Drop a block's registration: it is no longer findable.
    fn forget(&mut self, b: u32) {
        if let Some(e) = self.entries[b as usize].take() {
            if self.by_hash.get(&e.hash) == Some(&b) {
                self.by_hash.remove(&e.hash);
            }
        }
    }

    /// Grow `table` so it covers `tokens` positions; false (and `table` unchanged) if the pool is short.
    pub fn ensure(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.available() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.take() {
                table.push(b);
            }
        }
        true
    }

    /// Give back a table's blocks (the table is left empty). Registered blocks nobody else uses
    /// become cached, the table's tail first in line for reuse.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..).rev() {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released more often than taken");
            *r = r.saturating_sub(1);
            if *r > 0 {
                continue;
            }
            if self.entries[b as usize].is_some() {
                self.tick += 1;
                self.lru_tick[b as usize] = self.tick;
                self.lru.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The longest cached prefix of `tokens`, at most `max_blocks` blocks, with `hashes` its
    /// chained block hashes ([`Self::extend_hashes`]). The blocks found are taken (counted) and
    /// appended to `table`; their identities come back, one per block.
    pub fn take_cached_prefix(
        &mut self,
        tokens: &[u32],
        hashes: &[u64],
        max_blocks: usize,
        table: &mut Vec<u32>,
    ) -> Vec<BlockKey> {
        let bs = self.block_size;
        let mut keys: Vec<BlockKey> = Vec::new();
        for (k, h) in hashes.iter().enumerate().take(max_blocks) {
            let Some(&b) = self.by_hash.get(h) else {
                break;
            };
            let Some(e) = &self.entries[b as usize] else {
                break;
            };
            // Confirm: same tokens after the same (confirmed) parent; a hash collision misses.
            let Some(want) = tokens.get(k * bs..(k + 1) * bs) else {
                break;
            };
            if e.parent != keys.last().copied() || e.tokens != want {
                break;
            }
            let key = BlockKey {
                block: b,
                serial: e.serial,
            };
            if self.refs[b as usize] == 0 {
                self.lru.remove(&self.lru_tick[b as usize]);
            }
            self.refs[b as usize] += 1;
            table.push(b);
            keys.push(key);
        }
        keys
    }

    /// Whether a block with this hash is findable now (no confirmation: a hint for scheduling).
    pub fn is_findable(&self, hash: u64) -> bool {
        self.by_hash.contains_key(&hash)
    }

    /// Make block `b` (in use, completely written, its K/V computed) findable as `tokens` after
    /// `parent`. If the same contents are already registered elsewhere, that block's identity
    /// comes back and `b` stays unregistered (it is freed empty when released).
    pub fn register(
        &mut self,
        b: u32,
        hash: u64,
        parent: Option<BlockKey>,
        tokens: &[u32],
    ) -> BlockKey {
        if let Some(e) = &self.entries[b as usize] {
            return BlockKey {
                block: b,
                serial: e.serial,
            };
        }
        if let Some(&o) = self.by_hash.get(&hash) {
            if let Some(e) = &self.entries[o as usize] {
                if e.parent == parent && e.tokens == tokens {
                    return BlockKey {
                        block: o,
                        serial: e.serial,
                    };
                }
            }
            // A collision (or contents under a parent since reused): the newer one is findable.
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        self.by_hash.insert(hash, b);
        self.entries[b as usize] = Some(Entry {
            hash,
            serial,
            parent,
            tokens: tokens.to_vec(),
        });
        BlockKey { block: b, serial }
    }

    /// The pool's bookkeeping is consistent: every block is exactly one of in use, free or
    /// cached, and every findable hash names a registered block. For tests.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![0u8; self.total];
        for &b in &self.free {
            seen[b as usize] += 1;
            if self.refs[b as usize] != 0 || self.entries[b as usize].is_some() {
                return Err(format!("free block {b} is in use or registered"));
            }
        }
        for (&t, &b) in &self.lru {
            seen[b as usize] += 1;
            if self.refs[b as usize] != 0
                || self.entries[b as usize].is_none()
                || self.lru_tick[b as usize] != t
            {
                return Err(format!("cached block {b} is in use or unregistered"));
            }
        }
        for (b, &s) in seen.iter().enumerate() {
            let used = self.refs[b] > 0;
            if s + used as u8 != 1 {
                return Err(format!(
                    "block {b}: in use {used}, listed {s} times as free or cached"
                ));
            }
        }
        for (h, &b) in &self.by_hash {
            if self.entries[b as usize].as_ref().map(|e| e.hash) != Some(*h) {
                return Err(format!(
                    "hash {h:x} names block {b}, which holds other contents"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// Write-and-register every full block of `tokens` held by `table`, as the engine does
    /// after a step.
    fn register_all(p: &mut BlockPool, table: &[u32], tokens: &[u32]) -> Vec<BlockKey> {
        let mut hashes = Vec::new();
        p.extend_hashes(&mut hashes, tokens);
        let bs = p.block_size();
        let mut keys: Vec<BlockKey> = Vec::new();
        for (k, &h) in hashes.iter().enumerate() {
            let key = p.register(
                table[k],
                h,
                keys.last().copied(),
                &tokens[k * bs..(k + 1) * bs],
            );
            keys.push(key);
        }
        keys
    }

    fn cached(p: &mut BlockPool, tokens: &[u32], max: usize) -> (Vec<u32>, Vec<BlockKey>) {
        let mut hashes = Vec::new();
        p.extend_hashes(&mut hashes, tokens);
        let mut table = Vec::new();
        let keys = p.take_cached_prefix(tokens, &hashes, max, &mut table);
        (table, keys)
    }

    fn assert_idle(p: &BlockPool) {
        p.check().unwrap();
        assert_eq!(p.free_count() + p.cached_count(), p.total());
    }

    #[test]
    fn ensure_and_release() {
        let mut p = BlockPool::new(4, 16);
        let mut a = Vec::new();
        assert!(p.ensure(&mut a, 17));
        assert_eq!(a.len(), 2);
        assert!(p.ensure(&mut a, 32));
        assert_eq!(a.len(), 2);
        let mut b = Vec::new();
        assert!(!p.ensure(&mut b, 48));
        assert!(b.is_empty());
        p.release(&mut a);
        assert_eq!(p.free_count(), 4);
        assert!(p.ensure(&mut b, 48));
        p.release(&mut b);
        assert_idle(&p);
    }

    #[test]
    fn a_released_prefix_is_found_again_and_shared_with_counts() {
        let mut p = BlockPool::new(8, 4);
        let t = toks(10, 100); // 2 full blocks + 2 tokens
        let mut a = Vec::new();
        assert!(p.ensure(&mut a, t.len()));
        register_all(&mut p, &a, &t);
        // Shared while `a` still runs.
        let (mut b, keys) = cached(&mut p, &t, 9);
        assert_eq!(keys.len(), 2);
        assert_eq!(b, a[..2]);
        p.release(&mut a);
        // The two shared blocks are still in use by `b`; the partial one is empty again.
        assert_eq!(p.cached_count(), 0);
        assert_eq!(p.free_count(), 6);
        p.release(&mut b);
        assert_eq!(p.cached_count(), 2);
        let (mut c, keys) = cached(&mut p, &t, 1);
        assert_eq!(keys.len(), 1, "max_blocks caps the hit");
        assert_eq!(p.cached_count(), 1);
        p.release(&mut c);
        assert_idle(&p);
    }

    #[test]
    fn a_hash_collision_never_serves_other_tokens() {
        let mut p = BlockPool::new(4, 4);
        let t = toks(4, 0);
        let mut a = Vec::new();
        assert!(p.ensure(&mut a, 4));
        // Register other tokens under the hash of `t`: a forged collision.
        let h = p.block_hash(None, &t);
        p.register(a[0], h, None, &toks(4, 50));
        let (table, keys) = cached(&mut p, &t, 1);
        assert!(keys.is_empty() && table.is_empty());
        p.release(&mut a);
        assert_idle(&p);
    }

    #[test]
    fn stale_parent_identity_does_not_chain() {
        // Register a child under a parent, then reuse the parent block for other contents and
        // register the same parent tokens again in a different block: the child's recorded
        // parent identity is stale, so it is not served after the new parent.
        let mut p = BlockPool::new(4, 2);
        let t = toks(4, 0);
        let mut a = Vec::new();
        assert!(p.ensure(&mut a, 4));
        let keys = register_all(&mut p, &a, &t);
        let child = a[1];
        // Keep the child in use (another table), drop the parent to cached and evict it.
        let mut keep = vec![child];
        p.refs[child as usize] += 1;
        p.release(&mut a);
        let mut fill = Vec::new();
        assert!(p.ensure(&mut fill, 6)); // 2 empty + the cached parent
        assert_eq!(p.cached_count(), 0);
        p.release(&mut fill);
        // New parent block with the same tokens.
        let mut n = Vec::new();
        assert!(p.ensure(&mut n, 2));
        let k0 = register_all(&mut p, &n, &t[..2]);
        assert_ne!(k0[0], keys[0]);
        let (mut got, found) = cached(&mut p, &t, 2);
        assert_eq!(
            found.len(),
            1,
            "the child chains to a parent identity that is gone"
        );
        p.release(&mut got);
        p.release(&mut n);
        p.release(&mut keep);
        assert_idle(&p);
    }

    #[test]
    fn cached_blocks_are_reused_least_recently_released_first() {
        let mut p = BlockPool::new(4, 2);
        let (t1, t2) = (toks(4, 0), toks(4, 10));
        let mut a = Vec::new();
        assert!(p.ensure(&mut a, 4));
        register_all(&mut p, &a, &t1);
        let mut b = Vec::new();
        assert!(p.ensure(&mut b, 4));
        register_all(&mut p, &b, &t2);
        p.release(&mut a);
        p.release(&mut b);
        assert_eq!(p.free_count(), 0);
        assert_eq!(p.cached_count(), 4);
        // One new block: evicts the tail of the first released table.
        let mut c = Vec::new();
        assert!(p.ensure(&mut c, 1));
        let (mut x, k1) = cached(&mut p, &t1, 2);
        assert_eq!(k1.len(), 1, "t1's tail went first");
        let (mut y, k2) = cached(&mut p, &t2, 2);
        assert_eq!(k2.len(), 2);
        for t in [&mut c, &mut x, &mut y] {
            p.release(t);
        }
        assert_idle(&p);
    }

    #[test]
    fn duplicate_contents_register_once() {
        let mut p = BlockPool::new(4, 2);
        let t = toks(2, 7);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(p.ensure(&mut a, 2));
        assert!(p.ensure(&mut b, 2));
        let ka = register_all(&mut p, &a, &t);
        let kb = register_all(&mut p, &b, &t);
        assert_eq!(ka, kb, "the second writer gets the first block's identity");
        p.release(&mut b);
        assert_eq!(p.free_count(), 3, "the duplicate goes back empty");
        p.release(&mut a);
        assert_eq!(p.cached_count(), 1);
        assert_idle(&p);
    }

    #[test]
    fn salt_separates_pools() {
        let (p, q) = (BlockPool::with_salt(1, 2, 1), BlockPool::with_salt(1, 2, 2));
        assert_ne!(p.block_hash(None, &[1, 2]), q.block_hash(None, &[1, 2]));
    }
}
