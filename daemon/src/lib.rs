//! memshadowd's library: the notifier core, the device model, event sources and the server.

pub mod notifier;
