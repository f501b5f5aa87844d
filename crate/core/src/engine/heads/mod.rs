//! Heads on the engine's backbone, one file each: the head's slots, its forward pass from the
//! hidden states it reads, its loss, and its backward pass into the backbone's hidden-state
//! gradients; and the model (backbone + head over one flat buffer) a runner trains.

pub mod classification;
pub mod mim;
pub mod norm_linear;
