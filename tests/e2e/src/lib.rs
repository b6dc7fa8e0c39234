//! End-to-end tests of Sluice. The tests are in `tests/`, one file per
//! part; they drive the real Envoy, Redis and binaries through
//! `sluice-harness`.
