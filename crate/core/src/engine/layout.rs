//! The flat parameter buffer: every tensor of a model at an offset of one `Vec`, in the
//! model's creation order, except that each layer's query bias is moved behind the value
//! weight so that the query, key and value weights form one [3D, D] matrix (one QKV GEMM).

use crate::error::{Error, Result};

/// Where a tensor lives in the flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    fn end(&self) -> usize {
        self.offset + self.len
    }
}

/// Disjoint mutable slices of `buf` for `slots` (which must not overlap).
pub fn slots_mut<'a, T, const N: usize>(buf: &'a mut [T], slots: [Slot; N]) -> [&'a mut [T]; N] {
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

#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub slot: Slot,
}

/// The named tensors of a model and their slots; `entries` keeps the model's creation order.
#[derive(Debug, Clone)]
pub struct Layout {
    pub entries: Vec<Entry>,
    pub len: usize,
}

impl Layout {
    /// Slots for `tensors` (name, shape) given in creation order.
    pub fn new(tensors: &[(String, Vec<usize>)]) -> Self {
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        // Move each `...query.bias` after its layer's `...value.weight`.
        for (i, (name, _)) in tensors.iter().enumerate() {
            if let Some(prefix) = name.strip_suffix("query.bias") {
                let value = format!("{prefix}value.weight");
                if let Some(j) = tensors.iter().position(|(n, _)| *n == value) {
                    let from = order.iter().position(|&k| k == i).expect("in order");
                    order.remove(from);
                    let to = order.iter().position(|&k| k == j).expect("in order");
                    order.insert(to + 1, i);
                }
            }
        }
        let mut slots = vec![Slot { offset: 0, len: 0 }; tensors.len()];
        let mut offset = 0;
        for &i in &order {
            let len = tensors[i].1.iter().product();
            slots[i] = Slot { offset, len };
            offset += len;
        }
        let entries = tensors
            .iter()
            .zip(slots)
            .map(|((name, shape), slot)| Entry { name: name.clone(), shape: shape.clone(), slot })
            .collect();
        Self { entries, len: offset }
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The slot of `name`, which must have `shape`.
    pub fn slot(&self, name: &str, shape: &[usize]) -> Result<Slot> {
        match self.get(name) {
            Some(e) if e.shape == shape => Ok(e.slot),
            Some(e) => Err(Error::Config(format!("engine: tensor {name} has shape {:?}, expected {shape:?}", e.shape))),
            None => Err(Error::Config(format!("engine: the model has no tensor {name}"))),
        }
    }

    pub fn optional(&self, name: &str, shape: &[usize]) -> Result<Option<Slot>> {
        match self.get(name) {
            None => Ok(None),
            Some(_) => self.slot(name, shape).map(Some),
        }
    }
}

impl Layout {
    /// The values of `tensors` (name, shape, values; the layout's entry order) in one buffer.
    pub fn flatten<T: Copy + Default>(&self, tensors: &[(String, Vec<usize>, Vec<T>)]) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.len];
        for ((name, _, values), entry) in tensors.iter().zip(&self.entries) {
            if values.len() != entry.slot.len {
                return Err(Error::Config(format!(
                    "engine: {name} has {} values for shape {:?}",
                    values.len(),
                    entry.shape
                )));
            }
            entry.slot.of_mut(&mut out).copy_from_slice(values);
        }
        Ok(out)
    }
}
