//! Sluice filter.
