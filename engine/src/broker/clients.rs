//! Client id -> session slot, for the sessions homed on this shard.
//!
//! Stores only the slot (4 bytes a client, plus hashbrown's control byte):
//! the id itself lives in the session, and lookups compare against it. A
//! `HashMap<ByteStr, usize>` cost 40 bytes a client for a second copy of
//! the key's handle. Seeded foldhash: client ids come from the network.

use super::SessionEntry;
use hashbrown::HashTable;
use slab::Slab;
use std::hash::BuildHasher;
use tarta_proto::ByteStr;

pub type Sessions = Slab<Box<SessionEntry>>;

pub struct Clients {
    table: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            table: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl Clients {
    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The slot of `id`'s session.
    pub fn get(&self, id: &ByteStr, sessions: &Sessions) -> Option<usize> {
        self.table
            .find(self.hash(id.as_str()), |&s| {
                sessions
                    .get(s as usize)
                    .is_some_and(|e| &*e.session.client_id == id.as_str())
            })
            .map(|&s| s as usize)
    }

    /// Registers session `sid` (already in `sessions`) under its client id.
    pub fn insert(&mut self, sid: usize, sessions: &Sessions) {
        let Some(e) = sessions.get(sid) else { return };
        let h = self.hash(&e.session.client_id);
        let hasher = &self.hasher;
        self.table.insert_unique(h, sid as u32, |&s| {
            sessions
                .get(s as usize)
                .map_or(0, |e| hasher.hash_one(&*e.session.client_id))
        });
    }

    /// Forgets session `sid`, registered under `id`.
    pub fn remove(&mut self, id: &str, sid: usize) {
        if let Ok(e) = self.table.find_entry(self.hash(id), |&s| s as usize == sid) {
            e.remove();
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;

    fn entry(id: &str) -> Box<SessionEntry> {
        Box::new(SessionEntry {
            session: Session::new(ByteStr::from(id.to_string()), false, 8, 8),
            conn: None,
            acl: None,
            generation: 0,
            expiry: 0,
            rare: None,
            congested: false,
        })
    }

    #[test]
    fn finds_inserts_and_removes_by_client_id_across_growth() {
        let mut sessions = Sessions::new();
        let mut clients = Clients::default();
        let ids: Vec<String> = (0..5000).map(|i| format!("device-{i}")).collect();
        for id in &ids {
            let sid = sessions.insert(entry(id));
            clients.insert(sid, &sessions);
        }
        assert_eq!(clients.len(), ids.len());
        for id in &ids {
            let b = ByteStr::from(id.clone());
            let sid = clients.get(&b, &sessions).expect("registered");
            assert_eq!(&*sessions[sid].session.client_id, b.as_str());
        }
        assert_eq!(
            clients.get(&ByteStr::from("nobody".to_string()), &sessions),
            None
        );
        // Remove every other one; the rest stay reachable.
        for id in ids.iter().step_by(2) {
            let b = ByteStr::from(id.clone());
            let sid = clients.get(&b, &sessions).expect("registered");
            clients.remove(&b, sid);
            sessions.remove(sid);
        }
        assert_eq!(clients.len(), ids.len() / 2);
        for (i, id) in ids.iter().enumerate() {
            let found = clients.get(&ByteStr::from(id.clone()), &sessions).is_some();
            assert_eq!(found, i % 2 == 1, "{id}");
        }
    }
}
