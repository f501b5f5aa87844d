//! The flat parameter buffer: every tensor of a table at an offset of one `Vec`, in table
//! order (so the query, key and value weights a block table declares one after the other form
//! one [3D, D] matrix).

use super::table::{ParamId, ParamTable};
use crate::error::{Error, Result};

/// Where a tensor lives in the flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    pub offset: usize,
    pub len: usize,
}

impl Slot {
    pub fn of<'a, T>(&self, buf: &'a [T]) -> &'a [T] {
        &buf[self.offset..self.offset + self.len]
    }

    pub fn of_mut<'a, T>(&self, buf: &'a mut [T]) -> &'a mut [T] {
        &mut buf[self.offset..self.offset + self.len]
    }

    pub fn end(&self) -> usize {
        self.offset + self.len
    }
}

/// Disjoint mutable slices of `buf` for `slots` (which must not overlap).
pub fn slots_mut<T, const N: usize>(buf: &mut [T], slots: [Slot; N]) -> [&mut [T]; N] {
    for (i, a) in slots.iter().enumerate() {
        assert!(a.end() <= buf.len(), "slot {a:?} outside a buffer of {}", buf.len());
        for b in &slots[i + 1..] {
            assert!(
                a.end() <= b.offset || b.end() <= a.offset || a.len == 0 || b.len == 0,
                "slots {a:?} and {b:?} overlap"
            );
        }
    }
    let ptr = buf.as_mut_ptr();
    // SAFETY: every slot is inside `buf` and no two overlap (checked above), so the slices
    // are disjoint borrows of `buf` for its lifetime.
    slots.map(|s| unsafe { std::slice::from_raw_parts_mut(ptr.add(s.offset), s.len) })
}

/// The slots of a table's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    slots: Vec<Slot>,
    /// Values in all.
    pub len: usize,
}

impl Layout {
    pub fn new(table: &ParamTable) -> Self {
        let mut offset = 0;
        let slots = table
            .params()
            .iter()
            .map(|p| {
                let slot = Slot { offset, len: p.len() };
                offset += slot.len;
                slot
            })
            .collect();
        Self { slots, len: offset }
    }

    pub fn slot(&self, id: ParamId) -> Slot {
        self.slots[id.0]
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// One slot over parameters that lie one after the other in this order (a fused matrix).
    pub fn span(&self, ids: &[ParamId]) -> Result<Slot> {
        let first = self.slot(ids[0]);
        let mut end = first.offset;
        for &id in ids {
            let s = self.slot(id);
            if s.offset != end {
                return Err(Error::Config(format!(
                    "parameters {ids:?} are not adjacent in their table: they cannot be read as one matrix"
                )));
            }
            end = s.end();
        }
        Ok(Slot { offset: first.offset, len: end - first.offset })
    }
}
