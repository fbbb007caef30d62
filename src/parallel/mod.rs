//! parallel layer (see ARCHITECTURE.md).
