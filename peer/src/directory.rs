//! The client list as this peer knows it: filled by the tracker's full list
//! (broadcast mode) or by the state of the names this peer follows (subscribe
//! mode), kept current by its deltas, and kept (stale) while the tracker is
//! away so that known peers stay reachable.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
};

use tincan_proto::{
    Name, PeerId,
    tracker::{PeerInfo, PresenceChange},
};

/// How the tracker tells this peer who is online (its `--presence` mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PresenceMode {
    /// Everyone online is on the client list.
    #[default]
    Broadcast,
    /// Only the names this peer follows are, at most `max_subscriptions`.
    Subscribe { max_subscriptions: usize },
}

#[derive(Default)]
pub struct Directory {
    by_name: HashMap<String, PeerInfo>,
    mode: PresenceMode,
    /// Subscribe mode: the names followed in this enrollment, by key.
    followed: BTreeMap<String, Name>,
}

impl Directory {
    /// Replaces everything with a fresh list (everyone, or the online ones
    /// among `followed`); returns the changes relative to what was known
    /// before (for peers that came and went while the tracker was away), as
    /// (name, id, online).
    pub fn replace(
        &mut self,
        mode: PresenceMode,
        followed: &[Name],
        peers: Vec<PeerInfo>,
    ) -> Vec<(Name, PeerId, bool)> {
        self.mode = mode;
        self.followed = followed.iter().map(|n| (n.key(), n.clone())).collect();
        let mut fresh: HashMap<String, PeerInfo> =
            peers.into_iter().map(|p| (p.name.key(), p)).collect();
        let mut changes = Vec::new();
        for (key, old) in &self.by_name {
            match fresh.get(key) {
                Some(new) if new.id == old.id => {}
                _ => changes.push((old.name.clone(), old.id, false)),
            }
        }
        for (key, new) in &fresh {
            match self.by_name.get(key) {
                Some(old) if old.id == new.id => {}
                _ => changes.push((new.name.clone(), new.id, true)),
            }
        }
        std::mem::swap(&mut self.by_name, &mut fresh);
        changes
    }

    /// Applies one delta; returns (name, id, online).
    pub fn apply(&mut self, change: PresenceChange) -> (Name, PeerId, bool) {
        match change {
            PresenceChange::Joined(info) => {
                let out = (info.name.clone(), info.id, true);
                self.by_name.insert(info.name.key(), info);
                out
            }
            PresenceChange::Left { name, id } => {
                if self.by_name.get(&name.key()).is_some_and(|p| p.id == id) {
                    self.by_name.remove(&name.key());
                }
                (name, id, false)
            }
        }
    }

    pub fn get(&self, name: &Name) -> Option<&PeerInfo> {
        self.by_name.get(&name.key())
    }

    /// Puts `info` on the list; true if its name was not there.
    pub fn insert(&mut self, info: PeerInfo) -> bool {
        self.by_name.insert(info.name.key(), info).is_none()
    }

    pub fn all(&self) -> Vec<PeerInfo> {
        let mut all: Vec<PeerInfo> = self.by_name.values().cloned().collect();
        all.sort_by_key(|p| p.name.key());
        all
    }

    pub fn mode(&self) -> PresenceMode {
        self.mode
    }

    /// Subscribe mode: whether `name` is followed in this enrollment.
    pub fn follows(&self, name: &Name) -> bool {
        self.followed.contains_key(&name.key())
    }

    /// Subscribe mode: follows `name` from now on if it is not followed yet
    /// and there is room; returns whether it was added.
    pub fn follow(&mut self, name: Name) -> bool {
        let PresenceMode::Subscribe { max_subscriptions } = self.mode else {
            return false;
        };
        let key = name.key();
        if self.followed.len() >= max_subscriptions || self.followed.contains_key(&key) {
            return false;
        }
        self.followed.insert(key, name);
        true
    }

    /// Subscribe mode: the names followed in this enrollment, in name order.
    pub fn followed(&self) -> Vec<Name> {
        self.followed.values().cloned().collect()
    }

    /// One page of the list in name-key order after `after`: at most
    /// `limit` entries, and whether more follow.
    pub fn page(&self, after: Option<&Name>, limit: usize) -> (Vec<PeerInfo>, bool) {
        let sorted: BTreeMap<String, &PeerInfo> =
            self.by_name.iter().map(|(k, p)| (k.clone(), p)).collect();
        let from = after.map_or(Bound::Unbounded, |n| Bound::Excluded(n.key()));
        let mut rest = sorted.range((from, Bound::Unbounded));
        let page = rest
            .by_ref()
            .take(limit)
            .map(|(_, p)| (*p).clone())
            .collect();
        (page, rest.next().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, key: u8) -> PeerInfo {
        PeerInfo {
            name: Name::parse(name).unwrap(),
            id: PeerId([key; 32]),
            observed: "127.0.0.1:1".parse().unwrap(),
            local_addrs: vec![],
        }
    }

    #[test]
    fn replacing_the_list_reports_who_came_and_went() {
        let mut d = Directory::default();
        let all = PresenceMode::Broadcast;
        d.replace(all, &[], vec![info("alice", 1), info("bob", 2)]);
        let mut changes = d.replace(all, &[], vec![info("bob", 2), info("carol", 3)]);
        changes.sort_by_key(|c| c.0.key());
        let names: Vec<(String, bool)> = changes.iter().map(|c| (c.0.to_string(), c.2)).collect();
        assert_eq!(names, [("alice".into(), false), ("carol".into(), true)]);
    }

    #[test]
    fn a_stale_leave_does_not_remove_a_newer_key() {
        let mut d = Directory::default();
        d.apply(PresenceChange::Joined(info("alice", 2)));
        d.apply(PresenceChange::Left {
            name: Name::parse("alice").unwrap(),
            id: PeerId([1; 32]),
        });
        assert!(d.get(&Name::parse("ALICE").unwrap()).is_some());
    }

    #[test]
    fn pages_cover_the_list_once_in_name_order() {
        let mut d = Directory::default();
        let peers = ["dave", "Alice", "carol", "bob", "eve"];
        let peers = peers.iter().zip(1..).map(|(n, k)| info(n, k)).collect();
        d.replace(PresenceMode::Broadcast, &[], peers);
        let (first, more) = d.page(None, 2);
        assert!(more);
        let after = first.last().map(|p| p.name.clone());
        let (second, more) = d.page(after.as_ref(), 10);
        assert!(!more);
        let names: Vec<String> = first.iter().chain(&second).map(|p| p.name.key()).collect();
        assert_eq!(names, ["alice", "bob", "carol", "dave", "eve"]);
    }

    #[test]
    fn a_subscribe_enrollment_records_what_is_followed() {
        let mut d = Directory::default();
        let bob = Name::parse("Bob").unwrap();
        let mode = PresenceMode::Subscribe {
            max_subscriptions: 2,
        };
        d.replace(mode, std::slice::from_ref(&bob), vec![]);
        assert_eq!(d.mode(), mode);
        assert!(d.follows(&Name::parse("bob").unwrap()));
        assert!(!d.follow(Name::parse("BOB").unwrap()), "followed already");
        assert!(d.follow(Name::parse("carol").unwrap()));
        assert!(!d.follow(Name::parse("dave").unwrap()), "no room");
        assert_eq!(d.followed().len(), 2);
        d.replace(PresenceMode::Broadcast, &[], vec![]);
        assert!(d.followed().is_empty());
    }
}
