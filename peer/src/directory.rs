//! The client list as this peer knows it: filled by the tracker's full list,
//! kept current by its deltas, and kept (stale) while the tracker is away so
//! that known peers stay reachable.

use std::collections::HashMap;

use tincan_proto::{
    Name, PeerId,
    tracker::{PeerInfo, PresenceChange},
};

#[derive(Default)]
pub struct Directory {
    by_name: HashMap<String, PeerInfo>,
}

impl Directory {
    /// Replaces everything with a fresh full list; returns the changes
    /// relative to what was known before (for peers that came and went while
    /// the tracker was away), as (name, id, online).
    pub fn replace(&mut self, peers: Vec<PeerInfo>) -> Vec<(Name, PeerId, bool)> {
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

    pub fn insert(&mut self, info: PeerInfo) {
        self.by_name.insert(info.name.key(), info);
    }

    pub fn all(&self) -> Vec<PeerInfo> {
        let mut all: Vec<PeerInfo> = self.by_name.values().cloned().collect();
        all.sort_by_key(|p| p.name.key());
        all
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
        d.replace(vec![info("alice", 1), info("bob", 2)]);
        let mut changes = d.replace(vec![info("bob", 2), info("carol", 3)]);
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
}
