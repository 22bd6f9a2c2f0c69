//! memshadowd's library: the notifier core, the device model, event sources and the server.

pub mod address_space;
pub mod bind;
pub mod config;
pub mod device;
pub mod dirty;
pub mod events;
pub mod handover;
pub mod monitor;
pub mod notifier;
pub mod server;
pub mod service;
pub mod source;
pub mod startup;
pub mod sys;
#[cfg(test)]
mod test_support;
pub mod trace;
pub mod workers;

/// Locks `m`, taking the data over from a holder that panicked: every daemon mutex guards
/// state that stays consistent between statements, and one panicked thread must not take
/// the whole daemon down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
