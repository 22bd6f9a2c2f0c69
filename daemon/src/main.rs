//! `memshadowd`: the memshadow daemon.

fn main() {}
