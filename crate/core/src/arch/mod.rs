//! The architectures as parameter tables: what each part of each model holds (names, shapes,
//! initialisation, decay groups, layer ids), shared by the candle models (`model`) and the CPU
//! engine (`engine`), which each compute with them in their own way.

pub mod backbone;
pub mod classification;
pub mod dvae;
pub mod mim;
pub mod segmentation;
