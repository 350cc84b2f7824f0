//! Keeps one service instance registered in etcd.
//!
//! A registration is a key under a lease: granted, put, and kept alive.
//! When the lease is lost (etcd away longer than its TTL, the keepalive
//! stream closed, "requested lease not found"), a new lease is granted and
//! the key put again, with a growing, jittered pause, until it is back. It
//! talks to one etcd member at a time and moves to the next after a
//! failure. [`EtcdOptions`] says how to reach etcd (TLS, user, timeouts).
//!
//! # A member that stops answering
//!
//! A partitioned or frozen member must not cost a live instance its
//! registration. The lease is renewed five times per TTL, and each renewal
//! must be answered within a deadline well under the TTL (a fifth of it,
//! at least 500 ms; see `keepalive_deadline` in the source for the
//! budget): etcd itself may take ~7 s to say "no leader" or "timed out",
//! and a frozen member never answers. On a missed deadline, an error or a
//! "no leader", the owner moves to the next member at once (every other
//! member is tried before any pause) and keeps the *same* lease alive
//! through it, then catches up with what was done to the key meanwhile.
//! Only when a member answers that the lease is gone is a new one granted
//! and the key put again: a new lease means the key deleted and put back,
//! which watchers (sync-server) would see as the instance leaving and
//! coming back. [`Registration::current_member`] says which member the
//! lease is kept alive through.
//!
//! # Changes made by others
//!
//! The process that keeps a key registered (its owner) watches the key, and
//! before each re-registration reads it again, so that operators' changes
//! (`etcd-mesh-register set-weight` and `drain`, or etcdctl) outlive lease
//! losses instead of being overwritten by the owner's own weight:
//!
//! - A weight written by someone else is adopted and kept, across
//!   re-registrations, until it is changed again here or there: the latest
//!   change wins. Weight 0 (drained) is kept like any other. Only the
//!   weight is adopted; the owner writes its own address and metadata.
//!   A weight found in etcd on registering again is not adopted over one
//!   asked for through [`Registration::set_weight`] while away.
//! - A key deleted by someone else while the owner's lease is alive
//!   (`drain`'s last step, `etcdctl del`) is put back at once at weight 0:
//!   the instance is taken out of traffic and stays so, still listed, until
//!   a weight is set again or its process stops. A running owner's key
//!   cannot be removed for good from outside; stop the process for that.
//! - A key deleted because the lease ended (expired, revoked) is a loss:
//!   registered again with the weight kept.
//! - A key put without a lease (`etcdctl put`) is put back under the
//!   owner's lease, so that it still goes when the owner dies. A key put
//!   under another lease (another process registering the same instance)
//!   is left be.
//!
//! A process that starts registers its own configured weight: operators'
//! changes live as long as the process that adopted them.
//!
//! # Ending
//!
//! [`Registration::deregister`] revokes the lease (the key goes with it)
//! and waits until that is done, so callers stop being routed to the
//! instance without waiting for the TTL. Dropping a [`Registration`] does
//! the same without waiting: the background task revokes the lease if the
//! tokio runtime lives on long enough (a runtime shutting down cancels it;
//! the key then expires with its TTL, as after a crash).
//!
//! The key and value follow etcd's gRPC naming (`<prefix><service>/<addr>`,
//! `{"Op":0,"Addr":..,"Metadata":{"weight":..}}`) or the older openim-v2
//! form (`<schema>:///<service>/<addr>` → `addr`, no weight to adopt).
//!
//! # Layout
//!
//! - `instance`: the instance, its validation, its key and value;
//! - `keeper`: the task that keeps the key registered, and its handle;
//! - `keeper::lease`: renewing the lease through one member, under a
//!   deadline of its own;
//! - `keeper::adopt`: what the owner makes of changes others made to the
//!   key;
//! - [`admin`]: the operators' side (`set-weight`, `drain`).

#![forbid(unsafe_code)]

pub mod admin;
mod instance;
mod keeper;

pub use etcd_mesh_etcd_options::{Backoff, ConnectError, EtcdOptions, EtcdTls};
pub use instance::{Instance, InstanceError, KeyFormat};
pub use keeper::{Registration, State};
