//! A registry of entries by slot, reusing freed slots: each waiter keeps its slot to update
//! its entry (a new waker) and to leave. Used by the drain's bell (`watch.rs`).

/// Entries by slot; freed slots are reused.
#[derive(Debug)]
pub(crate) struct Slots<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slots<T> {
    /// Puts `value` in `slot` if it is one of ours, else in a free or new slot; returns it.
    pub(crate) fn put(&mut self, slot: Option<usize>, value: T) -> usize {
        let slot = match slot {
            Some(slot) if slot < self.slots.len() => slot,
            _ => match self.free.pop() {
                Some(slot) => slot,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            },
        };
        self.slots[slot] = Some(value);
        slot
    }

    /// Empties `slot` for reuse (nothing if it is not one of ours, or empty already).
    pub(crate) fn remove(&mut self, slot: usize) {
        if let Some(entry @ Some(_)) = self.slots.get_mut(slot) {
            *entry = None;
            self.free.push(slot);
        }
    }

    /// Every entry, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_slots_are_reused_and_a_slot_is_updated_in_place() {
        let mut slots = Slots::default();
        let a = slots.put(None, 'a');
        let b = slots.put(None, 'b');
        assert_eq!(slots.put(Some(a), 'A'), a);
        slots.remove(b);
        slots.remove(b);
        assert_eq!(slots.put(None, 'c'), b, "a freed slot is reused, once");
        assert_eq!(slots.put(None, 'd'), 2);
        assert_eq!(slots.iter().copied().collect::<String>(), "Acd");
        assert_eq!(
            slots.put(Some(7), 'e'),
            3,
            "a slot that is not ours is not used"
        );
        assert_eq!(slots.iter().count(), 4);
    }
}
