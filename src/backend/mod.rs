//! backend layer (see ARCHITECTURE.md).
