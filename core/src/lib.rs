//! Sluice core.
