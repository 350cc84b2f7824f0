//! The tables the console holds: what the change feed (`/v1/changes`)
//! answered, applied the way the plugin's poller applies it, and a short log
//! of what each answer changed.
//!
//! Whether an answer fits what is held is the feed's one rule, the
//! plugin's too ([`fit`]). An answer that does not fit (a delta from
//! another revision, epoch or observer, an older answer, a digest that
//! disagrees) is refused whole and the held tables are dropped, so the next
//! poll asks for everything.

use etcd_mesh_wire::feed::{fit, Cursor, Fit, Position};
use etcd_mesh_wire::{Changes, Digest, Health, Service};
use std::collections::{BTreeMap, VecDeque};

/// How many answers the change log keeps.
pub const LOG_LEN: usize = 20;

/// What one applied answer changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogEntry {
    pub revision: u64,
    /// Health-check changes published so far (they move the tables
    /// without a new etcd revision).
    pub health_seq: u64,
    pub full: bool,
    /// One line per change, e.g. `demo.Echo: 3 endpoints` or `removed x`.
    pub what: Vec<String>,
}

/// The tables at one revision of one epoch.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    /// Where the tables held stand; `None` until an answer is applied
    /// (revision 0 is a real revision of an empty etcd).
    pub cursor: Option<Cursor>,
    pub stale: bool,
    pub services: BTreeMap<String, Service>,
    /// Rejected keys and why.
    pub rejected: BTreeMap<String, String>,
    digest: Digest,
    /// Newest first.
    pub log: VecDeque<LogEntry>,
}

impl Tables {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an answer has been applied since the start or the last reset.
    pub fn holds(&self) -> bool {
        self.cursor.is_some()
    }

    /// The query that asks the change feed for what follows what is held:
    /// empty (everything) when nothing is held. `health_seq` goes back too,
    /// so that health-check changes wake the long-poll.
    pub fn query(&self) -> String {
        let Some(held) = &self.cursor else {
            return String::new();
        };
        let epoch: String = url_encode(&held.epoch);
        format!(
            "since={}&health_seq={}&epoch={epoch}",
            held.position.revision, held.position.health_seq
        )
    }

    /// Where the held tables are (the start when nothing is held).
    pub fn position(&self) -> Position {
        self.cursor.as_ref().map(|c| c.position).unwrap_or_default()
    }

    /// The epoch of the tables held (empty when nothing is held).
    pub fn epoch(&self) -> &str {
        self.cursor.as_ref().map_or("", |c| c.epoch.as_str())
    }

    /// Forgets the tables (the log stays), so the next poll asks for all.
    pub fn reset(&mut self) {
        let log = std::mem::take(&mut self.log);
        *self = Tables {
            log,
            ..Tables::default()
        };
    }

    /// Decodes, validates and applies one change-feed body. On an error
    /// nothing is applied and the tables are reset.
    pub fn apply_body(&mut self, body: &[u8]) -> Result<LogEntry, String> {
        let changes = Changes::decode(body).map_err(|e| {
            self.reset();
            e.to_string()
        })?;
        self.apply(changes).inspect_err(|_| self.reset())
    }

    fn apply(&mut self, changes: Changes) -> Result<LogEntry, String> {
        let answer_at = Position::of(&changes);
        match fit(self.cursor.as_ref(), &changes) {
            Fit::Apply => {}
            // Where the console differs from the plugin: the poller ignores
            // an answer older than what it holds (another replica behind,
            // it moves on); the console follows one sync-server, so an older
            // answer means that server went back, and it resets to show
            // what that server holds. The same position again is no news
            // for both (its `stale` flag still counts).
            Fit::Ignore => {
                let held = self.position();
                if answer_at < held {
                    return Err(format!(
                        "{}.{} is older than the held {}.{}",
                        answer_at.revision, answer_at.health_seq, held.revision, held.health_seq
                    ));
                }
                self.stale = changes.stale;
                return Ok(LogEntry {
                    revision: answer_at.revision,
                    health_seq: answer_at.health_seq,
                    full: changes.full,
                    what: Vec::new(),
                });
            }
            Fit::Refuse(why) => return Err(why),
        }
        let cursor = Cursor::of(&changes);
        // Built aside, so a refused answer leaves nothing half applied.
        let mut next = if changes.full {
            Tables {
                log: self.log.clone(),
                ..Tables::default()
            }
        } else {
            self.clone()
        };
        let mut what = Vec::new();
        for name in &changes.removed {
            if let Some(old) = next.services.remove(name) {
                next.digest.remove(Digest::of(name, &old));
                what.push(format!("removed {name}"));
            }
        }
        for (name, service) in changes.services {
            if let Some(old) = next.services.get(&name) {
                if *old == service && !changes.full {
                    continue; // a replica may repeat an unchanged service
                }
                next.digest.remove(Digest::of(&name, old));
            }
            next.digest.add(Digest::of(&name, &service));
            what.push(describe(&name, &service));
            next.services.insert(name, service);
        }
        for key in &changes.unrejected {
            if next.rejected.remove(key).is_some() {
                what.push(format!("no longer rejected {key}"));
            }
        }
        for rejected in changes.rejected {
            what.push(format!("rejected {}: {}", rejected.key, rejected.reason));
            next.rejected.insert(rejected.key, rejected.reason);
        }
        if next.digest.value() != changes.digest {
            return Err(format!(
                "the digest after applying revision {} is {:#x}, sync-server says {:#x}",
                changes.revision,
                next.digest.value(),
                changes.digest
            ));
        }
        next.cursor = Some(cursor);
        next.stale = changes.stale;
        let entry = LogEntry {
            revision: changes.revision,
            health_seq: changes.health_seq,
            full: changes.full,
            what,
        };
        if !entry.what.is_empty() || entry.full {
            next.log.push_front(entry.clone());
            next.log.truncate(LOG_LEN);
        }
        *self = next;
        Ok(entry)
    }
}

fn describe(name: &str, service: &Service) -> String {
    let weights: Vec<String> = service
        .endpoints
        .iter()
        .map(|e| e.weight.to_string())
        .collect();
    let (weights, s) = (weights.join(","), if weights.len() == 1 { "" } else { "s" });
    // Health counts in a fixed order, only those present.
    let health: Vec<String> = [Health::Healthy, Health::Unhealthy, Health::NotServing]
        .into_iter()
        .filter_map(|h| {
            let n = service
                .endpoints
                .iter()
                .filter(|e| e.health == Some(h))
                .count();
            (n > 0).then(|| format!("{n} {}", h.name()))
        })
        .collect();
    let health = if health.is_empty() {
        String::new()
    } else {
        format!("; {}", health.join(", "))
    };
    let n = service.endpoints.len();
    let endpoints = if n == 1 { "endpoint" } else { "endpoints" };
    format!("{name}: {n} {endpoints} (weight{s} {weights}{health})")
}

/// Percent-encodes everything but unreserved characters, for a query value.
fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::{Endpoint, Rejected};

    fn service(weights: &[u32]) -> Service {
        Service {
            endpoints: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Endpoint::new(format!("10.0.0.{}:80", i + 1), *w))
                .collect(),
        }
    }

    fn digest_of(services: &BTreeMap<String, Service>) -> u64 {
        let mut d = Digest::default();
        services.iter().for_each(|(n, s)| d.add(Digest::of(n, s)));
        d.value()
    }

    fn full(revision: u64, services: BTreeMap<String, Service>) -> Changes {
        Changes {
            revision,
            epoch: "e1".into(),
            full: true,
            digest: digest_of(&services),
            services,
            rejected: vec![Rejected {
                key: "bad/key".into(),
                reason: "not ip:port".into(),
            }],
            ..Changes::default()
        }
    }

    #[test]
    fn applies_a_full_answer_then_deltas() {
        let mut tables = Tables::new();
        assert_eq!(tables.query(), "");
        let mut services = BTreeMap::new();
        services.insert("a".to_string(), service(&[5, 1, 1]));
        services.insert("b".to_string(), service(&[1]));
        let entry = tables
            .apply_body(&full(10, services.clone()).encode())
            .expect("full");
        assert!(entry.full);
        assert_eq!(tables.position(), Position::new(10, 0));
        assert_eq!(tables.rejected["bad/key"], "not ip:port");
        assert_eq!(tables.query(), "since=10&health_seq=0&epoch=e1");

        services.remove("b");
        services.insert("a".to_string(), service(&[2]));
        let delta = Changes {
            revision: 12,
            since: 10,
            epoch: "e1".into(),
            services: [("a".to_string(), service(&[2]))].into(),
            removed: vec!["b".into()],
            unrejected: vec!["bad/key".into()],
            digest: digest_of(&services),
            ..Changes::default()
        };
        let entry = tables.apply_body(&delta.encode()).expect("delta");
        assert_eq!(
            entry.what,
            [
                "removed b",
                "a: 1 endpoint (weight 2)",
                "no longer rejected bad/key"
            ]
        );
        assert_eq!(tables.services, services);
        assert!(tables.rejected.is_empty());
        assert_eq!(tables.log.len(), 2);
    }

    #[test]
    fn refuses_what_does_not_fit_and_resets() {
        let mut tables = Tables::new();
        let services: BTreeMap<_, _> = [("a".to_string(), service(&[1]))].into();
        tables
            .apply_body(&full(10, services.clone()).encode())
            .expect("full");

        let other_epoch = Changes {
            revision: 11,
            since: 10,
            epoch: "e2".into(),
            digest: digest_of(&services),
            ..Changes::default()
        };
        assert!(tables.apply_body(&other_epoch.encode()).is_err());
        assert!(!tables.holds());
        assert_eq!(tables.query(), "");

        tables
            .apply_body(&full(10, services.clone()).encode())
            .expect("full");
        let wrong_digest = Changes {
            revision: 11,
            since: 10,
            epoch: "e1".into(),
            services: [("a".to_string(), service(&[3]))].into(),
            digest: 1,
            ..Changes::default()
        };
        let err = tables
            .apply_body(&wrong_digest.encode())
            .expect_err("digest");
        assert!(err.contains("digest"), "{err}");
        assert!(!tables.holds());

        assert!(tables.apply_body(b"{not json").is_err());
        let bad_weight = br#"{"revision":1,"epoch":"e","full":true,"services":{"a":{"endpoints":[{"addr":"1.2.3.4:5","weight":20000}]}},"digest":0}"#;
        assert!(tables.apply_body(bad_weight).is_err());
    }

    #[test]
    fn an_empty_delta_moves_the_revision_without_logging() {
        let mut tables = Tables::new();
        tables
            .apply_body(&full(3, BTreeMap::new()).encode())
            .expect("full");
        let empty = Changes {
            revision: 4,
            since: 3,
            epoch: "e1".into(),
            ..Changes::default()
        };
        tables.apply_body(&empty.encode()).expect("empty delta");
        assert_eq!(tables.position(), Position::new(4, 0));
        assert_eq!(tables.log.len(), 1);
    }

    #[test]
    fn a_health_change_is_a_delta_at_the_same_revision() {
        let mut tables = Tables::new();
        let services: BTreeMap<_, _> = [("a".to_string(), service(&[1, 1]))].into();
        tables
            .apply_body(&full(10, services).encode())
            .expect("full");
        let mut unhealthy = service(&[1, 1]);
        unhealthy.endpoints[1].health = Some(etcd_mesh_wire::Health::Unhealthy);
        let changed: BTreeMap<_, _> = [("a".to_string(), unhealthy)].into();
        let delta = Changes {
            revision: 10,
            health_seq: 1,
            since: 10,
            epoch: "e1".into(),
            digest: digest_of(&changed),
            services: changed,
            ..Changes::default()
        };
        let entry = tables.apply_body(&delta.encode()).expect("health delta");
        assert_eq!(entry.what, ["a: 2 endpoints (weights 1,1; 1 unhealthy)"]);
        assert_eq!(tables.query(), "since=10&health_seq=1&epoch=e1");
        // The same position again from a replica is no news, an older one is refused.
        let again = tables.apply_body(&delta.encode()).expect("no news");
        assert!(again.what.is_empty() && tables.holds());
        assert_eq!(tables.log.len(), 2);
        let older = Changes {
            revision: 10,
            epoch: "e1".into(),
            full: true,
            ..Changes::default()
        };
        assert!(tables.apply_body(&older.encode()).is_err());
    }

    #[test]
    fn encodes_the_epoch_for_the_query() {
        assert_eq!(url_encode("a b/c"), "a%20b%2Fc");
    }
}
