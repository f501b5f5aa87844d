//! beit-core: BEiT models, differentiable fused ops, AdamW and checkpoints on candle, and a
//! CPU training engine. No Node dependency: everything here is tested with `cargo test`.

pub mod backend;
pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
pub mod dvae;
pub mod engine;
pub mod error;
pub mod hf;
pub mod images;
pub mod launch;
pub mod mim;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod tokenizer;
pub mod trainer;

pub use classify::{ClassifierStepMetrics, ClassifierTrainer, ClassifierTrainingOptions, LinearProbe};
pub use config::{BeitConfig, ClassifierConfig, Pooling};
pub use dvae::DvaeConfig;
pub use error::{Error, Result};
pub use mim::{BeitStepMetrics, BeitTrainer, MimBatch, Predictions, PretrainBatch};
pub use optim::{AdamW, AdamWConfig};
pub use tokenizer::{DvaeStepMetrics, DvaeTrainer, DvaeTrainingOptions, ImageBatch, ReconLoss};
pub use trainer::Trainer;
