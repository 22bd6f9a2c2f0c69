//! memshadow wire protocol: message types, framing, versioning, limits and fd passing.
