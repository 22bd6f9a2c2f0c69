//! memshadowd's library: the notifier core, the device model, event sources and the server.

pub mod config;
pub mod device;
pub mod dirty;
pub mod events;
pub mod notifier;
pub mod server;
pub mod service;
pub mod source;
pub mod sys;
pub mod trace;
pub mod watched;
pub mod workers;
