//! Shared helpers for memshadow's cross-crate integration tests.
