//! Per-database classifiers: each database has its own user-defined functions, and those that
//! are volatile may write, so a call to one must run on the leader. The list is loaded from the
//! leader once per database and reloaded after DDL on functions passes through pgrelay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::classify::Classifier;

#[derive(Debug, Default)]
pub struct ClassifierCache {
    by_db: Mutex<HashMap<String, Arc<Classifier>>>,
    /// Bumped whenever any database's function list may have changed, so sessions holding an
    /// older classifier know to reload it.
    generation: AtomicU64,
}

impl ClassifierCache {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, db: &str) -> Option<Arc<Classifier>> {
        self.by_db.lock().ok().and_then(|m| m.get(db).cloned())
    }

    pub fn insert(&self, db: &str, classifier: Arc<Classifier>) {
        if let Ok(mut m) = self.by_db.lock() {
            m.insert(db.to_owned(), classifier);
        }
    }

    /// Forgets every database's classifier (the replication mode changed, and statement mode
    /// needs classifiers that know the catalog).
    pub fn invalidate_all(&self) {
        if let Ok(mut m) = self.by_db.lock() {
            m.clear();
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets a database's functions (after CREATE/ALTER/DROP FUNCTION and the like).
    pub fn invalidate(&self, db: &str) {
        if let Ok(mut m) = self.by_db.lock() {
            m.remove(db);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}
