//! Binding a client: from the fds it handed over to a [`AddressSpace`] client, with its device
//! client, its memory source and its dirty tracking (docs/design.md §6,
//! docs/threat-model.md).
//!
//! This module knows nothing of the wire: the server decodes `Bind`, calls
//! [`Binder::bind`], and maps a [`BindError`] to its error code (`server/wire_error.rs`).
//!
//! The steps, in order:
//!
//! 1. check the fds ([`Handover::check`]): a userfaultfd, the client's own `/proc/self`
//!    files, the mem file still leading to a live address space;
//! 2. choose the client's dirty-tracking back end, which decides the uffd's features;
//! 3. `UFFDIO_API` with the events the daemon needs and the back end's features;
//! 4. build the memory source (the client's mem file, arming pages for `uffd-wp`), the
//!    device client and the [`AddressSpace`] client.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use crate::address_space::AddressSpace;
use crate::device::{Account, Device};
use crate::dirty::uffd_wp::ArmingSource;
use crate::dirty::{Backend, ClientDirty, DirtyCounters, Selection};
use crate::handover::{Handover, HandoverError};
use crate::source::{MemFileSource, MemorySource};
use crate::sys::maps::Maps;
use crate::sys::uffd::{features, SharedUffd, Uffd, UffdError};

/// Why a client could not be bound. Each names the fd at fault or what it lacks.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The fds handed over are missing, extra or not what they must be.
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// The `soft-dirty` back end was chosen and the client handed over no `clear_refs`.
    #[error(
        "the soft-dirty back end needs the client's /proc/self/clear_refs (the last fd of Bind)"
    )]
    NoClearRefs,
    /// `UFFDIO_API` refused the features asked for: usually because it was done already
    /// (a uffd takes it once).
    #[error("UFFDIO_API failed: {0} (was UFFDIO_API already done on it?)")]
    ApiRefused(nix::Error),
    /// `UFFDIO_API` failed otherwise (also without fork events).
    #[error(transparent)]
    Api(UffdError),
}

/// What a bind is given by the client, beside its fds.
#[derive(Debug)]
pub struct BindRequest {
    /// The fds, in the order of the protocol (docs/protocol.md, `Bind`).
    pub fds: Vec<OwnedFd>,
    /// The pid of the client (its peer credentials): every `/proc` fd must be its own.
    pub pid: i32,
    /// The protocol version it speaks: from 2 on it hands over its maps.
    pub version: u16,
    /// True if its uffd was created without `UFFD_USER_MODE_ONLY` (as it claims).
    pub privileged_uffd: bool,
}

/// A client bound.
#[derive(Debug)]
pub struct Bound {
    /// The client as the event source and the device see it.
    pub watched: Arc<AddressSpace>,
    /// The features its uffd was given.
    pub uffd_features: u64,
}

/// What a new client is built with: the device, the dirty-tracking back ends found at
/// start-up, and the quotas and shadow share in force for it.
#[derive(Debug)]
pub struct Binder<'a> {
    /// The device the client's shadow lives in.
    pub device: &'a Device,
    /// The back ends that work here, and the daemon's choice.
    pub dirty: &'a Selection,
    /// The daemon-wide dirty-tracking counters the client counts into.
    pub dirty_counters: &'a Arc<DirtyCounters>,
    /// Shadow bytes the client may hold.
    pub shadow_quota: u64,
    /// Ranges the client may attach.
    pub mirrors_quota: u32,
    /// The shadow share of the client's user.
    pub account: Arc<Account>,
}

impl Binder<'_> {
    /// Checks what the client handed over and builds the client from it.
    pub fn bind(&self, req: BindRequest) -> Result<Bound, BindError> {
        let Handover {
            uffd,
            mem,
            maps,
            pagemap,
            clear_refs,
        } = Handover::check(req.fds, req.pid, req.version)?;
        // The dirty back end decides features of the uffd (WP_ASYNC or not): chosen now.
        let backend = self
            .dirty
            .for_client(pagemap.is_some(), req.privileged_uffd);
        let needs_clear_refs = matches!(backend, Ok(Backend::SoftDirty));
        let clear_refs = match (needs_clear_refs, clear_refs) {
            (true, None) => return Err(BindError::NoClearRefs),
            (true, some) => some,
            (false, _) => None,
        };
        let dirty_features = backend.as_ref().map_or(0, |b| b.uffd_features());
        let uffd_features = enable_features(&uffd, dirty_features)?;
        let dirty = Arc::new(ClientDirty::new(
            backend,
            clear_refs,
            Arc::clone(self.dirty_counters),
        ));
        let maps = maps.map(|f| Arc::new(Maps::new(f)));
        let uffd: SharedUffd = Arc::new(Mutex::new(Some(uffd)));
        let source = memory_source(mem, maps.clone(), &uffd, &dirty);
        let device = self
            .device
            .client_of(source, self.shadow_quota, Arc::clone(&self.account));
        device.set_trace_tag(u64::try_from(req.pid).unwrap_or(0));
        let watched = AddressSpace::with_dirty(uffd, device, pagemap, self.mirrors_quota, dirty);
        Ok(Bound {
            watched: Arc::new(watched.with_maps(maps)),
            uffd_features,
        })
    }
}

/// `UFFDIO_API` on the client's uffd: the unmap, remove and remap events, the features of
/// its dirty back end, and fork events if the daemon may have them (they need
/// `CAP_SYS_PTRACE`; without it the rest is asked again). The kernel answers with every
/// feature it offers; what is enabled is what was asked for, which is returned.
fn enable_features(uffd: &Uffd, dirty_features: u64) -> Result<u64, BindError> {
    let wanted =
        features::EVENT_UNMAP | features::EVENT_REMOVE | features::EVENT_REMAP | dirty_features;
    let with_fork = wanted | features::EVENT_FORK;
    match uffd.api(with_fork) {
        Ok(f) => Ok(f & with_fork),
        Err(UffdError::Api(nix::Error::EPERM)) => {
            uffd.api(wanted).map(|f| f & wanted).map_err(BindError::Api)
        }
        Err(UffdError::Api(errno)) => Err(BindError::ApiRefused(errno)),
        Err(e) => Err(BindError::Api(e)),
    }
}

/// The one way into the client's memory: the mem file it opened itself
/// (docs/threat-model.md), which arms the pages it copies when the client's back end is
/// `uffd-wp`.
fn memory_source(
    mem: File,
    maps: Option<Arc<Maps>>,
    uffd: &SharedUffd,
    dirty: &Arc<ClientDirty>,
) -> Arc<dyn MemorySource> {
    let source: Arc<dyn MemorySource> = Arc::new(MemFileSource::new(mem, maps));
    if dirty.is(Backend::UffdWp) {
        Arc::new(ArmingSource::new(
            source,
            Arc::clone(uffd),
            Arc::clone(dirty),
        ))
    } else {
        source
    }
}
