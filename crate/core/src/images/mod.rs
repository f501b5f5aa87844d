//! Image input: decoding, the shared-crop views of BEiT's pretraining transform, image + mask
//! pairs for segmentation, and batches decoded on a thread pool.

pub mod batch;
pub mod decode;
pub mod pairs;
pub mod views;

pub use batch::{load_views, Failure, Sources, ViewBatch, DEFAULT_MAX_PIXELS};
pub use decode::{decode, Decoded, Pixels};
pub use pairs::{
    load_pairs, load_whole_pairs, MaskSpec, PairAugment, PairBatch, PairSources, Photometric, Rescale, WholePair,
    WholePairBatch,
};
pub use views::{crop_box, Augment, Crop, CropBox, Interpolation, Jitter, ViewSpec};
