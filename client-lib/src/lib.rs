//! libmemshadow: the client library that hands a process's memory to `memshadowd`.
