//! beit-core: BEiT models, differentiable fused ops, AdamW and checkpoints on candle.
//! No Node dependency: everything here is tested with `cargo test`.

mod backend;
pub mod checkpoint;
pub mod classify;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
pub mod engine;
pub mod error;
pub mod hf;
pub mod images;
pub mod launch;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod trainer;

pub use classify::{ClassifierStepMetrics, ClassifierTrainer, FinetuneOptions, LinearProbe};
pub use config::{BeitConfig, ClassifierConfig, Pooling};
pub use error::{Error, Result};
pub use optim::{AdamW, AdamWConfig};
pub use trainer::{MimBatch, MimTrainer, Predictions, StepMetrics};
pub mod conv;
pub mod dvae;
pub mod tokenizer;

pub use dvae::DvaeConfig;
pub use tokenizer::{ImageBatch, ReconLoss, TokenizerStepMetrics, TokenizerTrainer, TokenizerTraining};
