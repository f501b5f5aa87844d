//! A batch of images -> contiguous view tensors, one image per task on a thread pool. An image
//! that cannot be read or decoded is reported with its reason and left out; the batch goes on.

use std::path::PathBuf;

use fast_image_resize::Resizer;
use rayon::prelude::*;
use rayon::ThreadPool;

use super::decode::{decode, Decoded, Pixels};
use super::views::{crop_box, mean_gray, needed_size, render_views, Augment, CropBox, Jitter, ViewSpec};
use crate::error::{Error, Result};

/// Where a batch's images come from.
pub enum Sources<'a> {
    /// Encoded image files, read on the pool.
    Files(&'a [PathBuf]),
    /// Decoded 8-bit images of one size, [count, height, width, channels] (IDX datasets);
    /// `indices` picks the batch's images.
    Pixels { data: &'a [u8], height: u32, width: u32, channels: u8, indices: &'a [u32] },
}

impl Sources<'_> {
    fn len(&self) -> usize {
        match self {
            Sources::Files(paths) => paths.len(),
            Sources::Pixels { indices, .. } => indices.len(),
        }
    }
}

pub struct Failure {
    /// Position in the request.
    pub index: u32,
    pub reason: String,
}

/// The kept images' views, each [kept, C, H, W] contiguous, in request order.
pub struct ViewBatch {
    pub views: Vec<Vec<f32>>,
    /// Request positions of the images in `views`.
    pub kept: Vec<u32>,
    pub failures: Vec<Failure>,
}

/// Decoded-pixel budget per image: 64 MP. Larger JPEGs are downscaled while decoding.
pub const DEFAULT_MAX_PIXELS: u64 = 64 << 20;

pub fn load_views(
    pool: &ThreadPool,
    sources: &Sources,
    augments: &[Augment],
    views: &[ViewSpec],
    max_pixels: u64,
) -> Result<ViewBatch> {
    if views.is_empty() {
        return Err(Error::Config("at least one view is needed".into()));
    }
    for view in views {
        view.validate()?;
        view.check_budget(max_pixels)?;
    }
    if augments.len() != sources.len() {
        return Err(Error::Config(format!(
            "{} augment entries for {} images; expected one per image",
            augments.len(),
            sources.len()
        )));
    }
    for augment in augments {
        augment.validate()?;
    }
    if let Sources::Pixels { data, height, width, channels, indices } = sources {
        let per = *height as usize * *width as usize * *channels as usize;
        if per == 0 || data.len() % per != 0 || (*channels != 1 && *channels != 3) {
            return Err(Error::Config(format!(
                "pixel source of {} bytes is not a whole number of {height}x{width}x{channels} images (channels 1 or 3)",
                data.len()
            )));
        }
        let count = data.len() / per;
        if let Some(bad) = indices.iter().find(|&&i| i as usize >= count) {
            return Err(Error::Config(format!(
                "image index {bad} is out of range: the pixel source holds {count} images"
            )));
        }
    }

    let sizes: Vec<usize> = views.iter().map(ViewSpec::values_per_image).collect();
    let per_image: Vec<std::result::Result<Vec<Vec<f32>>, String>> = pool.install(|| {
        (0..sources.len())
            .into_par_iter()
            .map_init(Resizer::new, |resizer, i| {
                let mut outs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
                let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
                load_one(sources, i, &augments[i], views, max_pixels, &mut slices, resizer)?;
                Ok(outs)
            })
            .collect()
    });

    let mut batch = ViewBatch {
        views: sizes.iter().map(|&n| Vec::with_capacity(n * sources.len())).collect(),
        kept: vec![],
        failures: vec![],
    };
    for (i, result) in per_image.into_iter().enumerate() {
        match result {
            Ok(outs) => {
                for (dst, src) in batch.views.iter_mut().zip(outs) {
                    dst.extend_from_slice(&src);
                }
                batch.kept.push(i as u32);
            }
            Err(reason) => batch.failures.push(Failure { index: i as u32, reason }),
        }
    }
    Ok(batch)
}

fn load_one(
    sources: &Sources,
    i: usize,
    augment: &Augment,
    views: &[ViewSpec],
    max_pixels: u64,
    outputs: &mut [&mut [f32]],
    resizer: &mut Resizer,
) -> std::result::Result<(), String> {
    let aspect = views[0].size[1] as f64 / views[0].size[0] as f64;
    let (pixels, b) = match sources {
        Sources::Files(paths) => {
            let bytes = std::fs::read(&paths[i]).map_err(|e| format!("cannot read file: {e}"))?;
            let full_box = |w: u32, h: u32| crop_box(&augment.crop, w, h, aspect);
            let request = |w: u32, h: u32| needed_size(&full_box(w, h), w, h, views);
            let Decoded { pixels, full_width, full_height } = decode(&bytes, max_pixels, &request)?;
            let full_box = full_box(full_width, full_height);
            let (sx, sy) = (pixels.width as f64 / full_width as f64, pixels.height as f64 / full_height as f64);
            let b = CropBox {
                left: full_box.left * sx,
                top: full_box.top * sy,
                width: full_box.width * sx,
                height: full_box.height * sy,
            };
            (pixels, b)
        }
        Sources::Pixels { data, height, width, channels, indices } => {
            let per = *height as usize * *width as usize * *channels as usize;
            let start = indices[i] as usize * per;
            let pixels = Pixels::new(*width, *height, *channels, data[start..start + per].to_vec());
            let b = crop_box(&augment.crop, *width, *height, aspect);
            (pixels, b)
        }
    };
    let needs_mean = augment.jitter.iter().any(|j| matches!(j, Jitter::Contrast { .. }));
    let gray_mean = if needs_mean { mean_gray(&pixels) } else { 0.0 };
    render_views(&pixels, &b, augment, gray_mean, views, outputs, resizer)
}
