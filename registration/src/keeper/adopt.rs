//! Changes made to the key by others (operators' `set-weight` and
//! `drain`, etcdctl), and what the owner makes of them: a weight written by
//! someone else is adopted and kept; a key deleted while the lease lives is
//! put back drained (weight 0); a key put without a lease is put back
//! under the owner's; a key put under another lease is left be. The rules,
//! and why, are the crate docs' "Changes made by others".
//!
//! The owner sees changes through its watch of the key, and catches up
//! with those it could not see: on registering again (the weight written
//! while away) and after moving to another member.

use super::{within, Owner};
use crate::{admin, KeyFormat};
use etcd_client::{Client, KeyValue};
use tracing::{info, warn};

/// What someone else did to the key.
pub(super) enum Change<'a> {
    Put(&'a KeyValue),
    Deleted,
}

impl Owner {
    /// Reads a weight someone else wrote; `None` for the openim-v2 form
    /// (its value holds no weight).
    fn weight_written_by_others(&self, value: &[u8]) -> Option<Result<u32, String>> {
        match self.instance.format {
            KeyFormat::EtcdNaming { .. } => Some(admin::weight_of(value)),
            KeyFormat::OpenimV2 { .. } => None,
        }
    }

    /// Before registering again: adopts a weight someone else wrote while
    /// this owner could not see the key (not over one asked for here
    /// meanwhile, which wins).
    pub(super) async fn adopt_what_was_written_while_away(
        &mut self,
        client: &mut Client,
    ) -> Result<(), String> {
        let timeout = self.options.request_timeout;
        let found = within(timeout, client.get(self.key.as_str(), None)).await?;
        if let (Some(kv), Some(written)) = (found.kvs().first(), self.written) {
            if kv.mod_revision() > written && !self.unwritten_request {
                if let Some(Ok(weight)) = self.weight_written_by_others(kv.value()) {
                    info!(key = %self.key, weight, "adopting the weight written in etcd while away");
                    self.keep_weight(weight);
                }
            }
        }
        Ok(())
    }

    /// After keeping the lease alive through another member: catches up
    /// with what was done to the key while no member watched it for this
    /// owner, as the watch would have, and returns the revision to watch
    /// from.
    pub(super) async fn catch_up(
        &mut self,
        client: &mut Client,
        lease: i64,
    ) -> Result<i64, String> {
        let found = within(
            self.options.request_timeout,
            client.get(self.key.as_str(), None),
        )
        .await?;
        let revision = found.header().map_or(0, |h| h.revision());
        match (found.kvs().first(), self.written) {
            // Never written under this lease, or a weight asked for here
            // while away (it wins): ours to write.
            (_, None) => self.put(client, lease).await?,
            _ if self.unwritten_request => self.put(client, lease).await?,
            (Some(kv), Some(written)) if kv.mod_revision() <= written => {}
            (Some(kv), Some(_)) => {
                self.someone_else_wrote(client, lease, Change::Put(kv))
                    .await?;
            }
            (None, Some(_)) => {
                self.someone_else_wrote(client, lease, Change::Deleted)
                    .await?;
            }
        }
        Ok(revision + 1)
    }

    /// Answers a change to the key made by someone else.
    pub(super) async fn someone_else_wrote(
        &mut self,
        client: &mut Client,
        lease: i64,
        change: Change<'_>,
    ) -> Result<(), String> {
        let key = self.key.clone();
        match change {
            Change::Put(kv) => {
                match self.weight_written_by_others(kv.value()) {
                    Some(Ok(weight)) => {
                        info!(%key, weight, "adopting the weight written in etcd");
                        self.keep_weight(weight);
                    }
                    Some(Err(reason)) => {
                        warn!(%key, %reason, "someone else wrote a weight that cannot be read; keeping mine");
                    }
                    None => {}
                }
                self.key_lease = kv.lease();
                if kv.lease() == 0 {
                    // Without a lease the key would outlive this process.
                    self.put(client, lease).await?;
                    info!(%key, "put the key back under its lease");
                }
                // Under another lease: another process registers the same
                // instance; it is left be (no tug of war).
            }
            Change::Deleted => {
                let still_alive = within(
                    self.options.request_timeout,
                    client.lease_time_to_live(lease, None),
                )
                .await?
                .ttl()
                    > 0;
                if !still_alive {
                    return Err("the lease expired (the key was deleted with it)".into());
                }
                if self.key_lease == lease {
                    // Deleted by hand (`drain`, `etcdctl del`): taken out of
                    // traffic, and kept out, but still listed.
                    warn!(%key, "the key was deleted by someone else; putting it back drained (weight 0)");
                    self.keep_weight(0);
                } else {
                    info!(%key, "the key went with another process's lease; registering it again");
                }
                self.put(client, lease).await?;
            }
        }
        Ok(())
    }
}
