//! The index of the partial bodies in the upload directory, by file name, by the name they were
//! sent under and oldest first, with their count and announced bytes for the budgets. Derived
//! from the directory alone (a partial's file name holds its checksum or resume id, its size and
//! a tag of its name): built by listing it at start-up and at each sweep, kept current by the
//! claims in between, so that a claim opens one computed name and never lists the directory.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use rustix::fs::AtFlags;
use rustix::io::Errno;

/// One partial, as its file name and its age tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The tag of the name it was sent under.
    pub tag: String,
    /// The whole file's announced size.
    pub size: u64,
    /// When it was last claimed (or, found by a listing, last written).
    pub since: SystemTime,
}

/// The partials of one upload directory. Shared by the stores a reload makes for the same one.
#[derive(Debug, Default)]
pub struct Index {
    inner: Mutex<Inner>,
}

/// The index under its lock.
#[derive(Debug, Default)]
pub struct Inner {
    entries: HashMap<String, Entry>,
    /// Every partial, oldest first (sorted; no two share a name): making room and expiring take
    /// from the front, a new claim usually goes at the back, so neither passes over up to
    /// `files.resume_max_count` of them. A sorted deque instead of a B-tree: 7 KiB less code.
    by_age: VecDeque<(SystemTime, String)>,
    /// The name tag's latest partial, for the superseding rule.
    by_tag: HashMap<String, String>,
    bytes: u64,
}

/// While alive, the partial it names is in use; dropped, it leaves the index if the file is gone
/// (committed under its final name, or discarded).
#[must_use = "the index forgets the partial only when this is dropped"]
#[derive(Debug)]
pub struct Listed {
    index: Arc<Index>,
    dir: Arc<File>,
    file_name: String,
}

impl Index {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change is a few map operations that leave the maps consistent even if cut short.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the index with what a listing found, keeping the entries claimed since the
    /// listing began (`began`), which it may have missed.
    pub fn rebuild(&self, listed: Vec<(String, Entry)>, began: SystemTime) {
        let mut inner = self.lock();
        let recent: Vec<(String, Entry)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.since >= began)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        *inner = Inner::default();
        for (name, entry) in listed.into_iter().chain(recent) {
            inner.insert(name, entry);
        }
    }

    /// A guard that takes `file_name` out of the index once the file is gone.
    pub fn listed(self: &Arc<Self>, dir: &Arc<File>, file_name: &str) -> Listed {
        Listed {
            index: Arc::clone(self),
            dir: Arc::clone(dir),
            file_name: file_name.to_string(),
        }
    }
}

impl Inner {
    /// Adds (or replaces) a partial.
    pub fn insert(&mut self, file_name: String, entry: Entry) {
        self.remove(&file_name);
        self.bytes = self.bytes.saturating_add(entry.size);
        let at = self
            .age_position(entry.since, &file_name)
            .unwrap_or_else(|at| at);
        self.by_age.insert(at, (entry.since, file_name.clone()));
        self.by_tag.insert(entry.tag.clone(), file_name.clone());
        self.entries.insert(file_name, entry);
    }

    pub fn remove(&mut self, file_name: &str) -> Option<Entry> {
        let entry = self.entries.remove(file_name)?;
        self.bytes = self.bytes.saturating_sub(entry.size);
        if let Ok(at) = self.age_position(entry.since, file_name) {
            self.by_age.remove(at);
        }
        if self.by_tag.get(&entry.tag).is_some_and(|n| n == file_name) {
            self.by_tag.remove(&entry.tag);
        }
        Some(entry)
    }

    /// Where `(since, file_name)` is in `by_age`, or where it would go.
    fn age_position(&self, since: SystemTime, file_name: &str) -> Result<usize, usize> {
        self.by_age
            .binary_search_by(|(t, n)| (t, n.as_str()).cmp(&(&since, file_name)))
    }

    pub fn count(&self) -> usize {
        self.entries.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The latest partial sent under the name with `tag`.
    pub fn by_tag(&self, tag: &str) -> Option<&str> {
        self.by_tag.get(tag).map(String::as_str)
    }

    /// The oldest partial not in `skip` (the few held by uploads right now), with when it was
    /// last claimed.
    pub fn oldest_except(&self, skip: &[String]) -> Option<(SystemTime, String)> {
        self.by_age
            .iter()
            .find(|(_, name)| !skip.contains(name))
            .cloned()
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let gone = matches!(
            rustix::fs::statat(
                &*self.dir,
                self.file_name.as_str(),
                AtFlags::SYMLINK_NOFOLLOW
            ),
            Err(Errno::NOENT)
        );
        if gone {
            self.index.lock().remove(&self.file_name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(tag: &str, size: u64, secs: u64) -> Entry {
        Entry {
            tag: tag.into(),
            size,
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    #[test]
    fn counts_ages_and_tags_follow_inserts_and_removals() {
        let index = Index::default();
        let mut i = index.lock();
        i.insert("a".into(), entry("t1", 10, 3));
        i.insert("b".into(), entry("t2", 20, 1));
        i.insert("c".into(), entry("t1", 5, 2));
        assert_eq!((i.count(), i.bytes()), (3, 35));
        assert_eq!(i.by_tag("t1"), Some("c"));
        let none = [];
        assert_eq!(i.oldest_except(&none).map(|(_, n)| n), Some("b".into()));
        let skip = ["b".to_string()];
        assert_eq!(i.oldest_except(&skip).map(|(_, n)| n), Some("c".into()));
        // Replacing an entry does not count it twice.
        i.insert("b".into(), entry("t2", 20, 9));
        assert_eq!((i.count(), i.bytes()), (3, 35));
        assert_eq!(i.remove("c").map(|e| e.size), Some(5));
        assert_eq!(i.by_tag("t1"), None, "the tag pointed at the removed one");
        assert_eq!(i.remove("c"), None);
        assert_eq!(i.oldest_except(&none).map(|(_, n)| n), Some("a".into()));
        drop(i);
        // A rebuild keeps what was claimed after the listing began.
        index.rebuild(
            vec![("z".into(), entry("t9", 1, 1))],
            SystemTime::UNIX_EPOCH + Duration::from_secs(5),
        );
        let i = index.lock();
        assert_eq!((i.count(), i.bytes()), (2, 21));
        assert_eq!(i.by_tag("t2"), Some("b"));
    }

    #[test]
    fn the_age_order_holds_through_any_order_of_claims() {
        // Claimed out of time order, ties on the time broken by name, re-claimed (moved to the
        // back), removed from the middle: the oldest is always the least (time, name) left.
        let index = Index::default();
        let mut i = index.lock();
        let mut model: Vec<(u64, String)> = Vec::new();
        let steps: &[(&str, Option<u64>)] = &[
            ("p", Some(5)),
            ("q", Some(2)),
            ("r", Some(8)),
            ("s", Some(2)),
            ("t", Some(1)),
            ("q", Some(9)),
            ("r", None),
            ("u", Some(5)),
            ("t", None),
            ("p", Some(0)),
        ];
        for (name, claimed) in steps {
            model.retain(|(_, n)| n != name);
            match claimed {
                Some(secs) => {
                    i.insert((*name).into(), entry(name, 1, *secs));
                    model.push((*secs, (*name).into()));
                }
                None => drop(i.remove(name)),
            }
            model.sort();
            let ages: Vec<(u64, String)> = i
                .by_age
                .iter()
                .map(|(t, n)| {
                    (
                        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
                        n.clone(),
                    )
                })
                .collect();
            assert_eq!(ages, model, "after {name} {claimed:?}");
            assert_eq!(i.count(), model.len());
        }
        let held = ["p".to_string()];
        assert_eq!(i.oldest_except(&held).map(|(_, n)| n), Some("s".into()));
    }
}
