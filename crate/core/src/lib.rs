//! beit-core: BEiT models, differentiable fused ops, AdamW and checkpoints on candle, and a
//! CPU training engine. No Node dependency: everything here is tested with `cargo test`.
//!
//! Leaf modules (no other module of the crate but `error`): `config`, `presets`, `float`,
//! `rng`, `params`, `arch` (the parameter tables), `optimizer` (AdamW's settings), `launch`.
//! The CPU engine (`engine`) and the candle models (`model`, `ops`, `conv`, `optim`) each
//! build on those alone; `runner` holds either; the model kinds (`mim`, `classify`,
//! `segment`, `tokenizer`) and their `trainer` sit on top.

// `!(x > 0.0)` is how the config checks reject NaN along with the out-of-range values.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod arch;
pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod float;
pub mod hf;
pub mod images;
pub mod launch;
pub mod mim;
pub mod model;
pub mod ops;
pub mod optim;
pub mod optimizer;
pub mod params;
pub mod presets;
pub mod rng;
pub mod runner;
pub mod segment;
pub mod tokenizer;
pub mod trainer;

pub use classify::{
    ClassifierLossMetrics, ClassifierStepMetrics, ClassifierTrainer, ClassifierTrainingOptions, LinearProbe,
};
pub use config::{BeitConfig, ClassifierConfig, DvaeConfig, Pooling, ReconLoss, SegmenterConfig};
pub use error::{Error, Result};
pub use mim::{BeitLossMetrics, BeitStepMetrics, BeitTrainer, MimBatch, Predictions, PretrainBatch};
pub use optimizer::AdamWConfig;
pub use rng::Draws;
pub use segment::{
    SegmentedImage, SegmenterLossMetrics, SegmenterStepMetrics, SegmenterTrainer, SegmenterTrainingOptions,
};
pub use tokenizer::{DvaeLossMetrics, DvaeStepMetrics, DvaeTrainer, DvaeTrainingOptions, ImageBatch};
pub use trainer::{Trainer, UpdateMetrics};
