//! Parameters as data: the table of a model (names, shapes, initialisation, decay groups,
//! layer ids), its flat layout, and the values it starts from.

pub mod layout;
pub mod table;
pub mod values;

pub use layout::{slots_mut, Layout, Slot};
pub use table::{Init, LinearParams, NormParams, Param, ParamId, ParamTable, Scope};
pub use values::Source;
