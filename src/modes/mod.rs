//! modes layer (see ARCHITECTURE.md).
