//! tokenizer layer (see ARCHITECTURE.md).
