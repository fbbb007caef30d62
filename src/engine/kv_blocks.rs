//! The pool of KV cache blocks: a free list. Sequences own block tables; freeing is returning ids.

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
}

impl BlockPool {
    pub fn new(total: usize, block_size: usize) -> Self {
        // Hand out low ids first (pop from the end).
        BlockPool {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grow `table` so it covers `tokens` positions; false (and `table` unchanged) if the pool is short.
    pub fn ensure(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                table.push(b);
            }
        }
        true
    }

    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
