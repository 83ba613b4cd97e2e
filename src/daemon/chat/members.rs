//! The room's members by id, in a Vec kept in id order (ids grow, and each member joins under
//! the room's lock): found by binary search, without a hash table type of their own.

use crate::daemon::chat::Member;

#[derive(Debug, Default)]
pub(super) struct Members(Vec<(u64, Member)>);

impl Members {
    /// Adds a member whose id is above every id here.
    pub(super) fn insert(&mut self, id: u64, member: Member) {
        debug_assert!(self.0.last().is_none_or(|(last, _)| *last < id));
        self.0.push((id, member));
    }

    pub(super) fn get(&self, id: &u64) -> Option<&Member> {
        let at = self.position(*id)?;
        self.0.get(at).map(|(_, m)| m)
    }

    pub(super) fn get_mut(&mut self, id: &u64) -> Option<&mut Member> {
        let at = self.position(*id)?;
        self.0.get_mut(at).map(|(_, m)| m)
    }

    pub(super) fn remove(&mut self, id: &u64) -> Option<Member> {
        let at = self.position(*id)?;
        Some(self.0.remove(at).1)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Member> {
        self.0.iter().map(|(_, m)| m)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Member> {
        self.0.iter_mut().map(|(_, m)| m)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &Member)> {
        self.0.iter().map(|(id, m)| (id, m))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Member)> {
        self.0.iter_mut().map(|(id, m)| (&*id, m))
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.0.binary_search_by_key(&id, |(i, _)| *i).ok()
    }
}
