//! Image + mask pairs for semantic segmentation, augmented together as mmseg trains BEiT on
//! ADE20K: random rescale (the image with the view's filter, the mask nearest-neighbour), a
//! random crop that avoids crops one class dominates, a flip, photometric distortion of the
//! image only, and padding to the crop size (the image with normalised 0, the mask with the
//! ignore index). Random parameters arrive drawn (TypeScript owns the RNG).
//!
//! Masks hold class ids: 8-bit (or narrower) grayscale or palette PNGs, where the palette
//! index is the id, as VOC's `SegmentationClass` stores them.

use std::io::Cursor;
use std::path::PathBuf;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{PixelType, ResizeOptions, Resizer};
use rayon::prelude::*;
use rayon::ThreadPool;
use serde::Deserialize;

use super::batch::Failure;
use super::decode::{decode, describe_pixels, Pixels};
use super::views::ViewSpec;
use crate::error::{Error, Result};

/// Where a batch's pairs come from.
pub enum PairSources<'a> {
    /// Encoded images and PNG masks, read on the pool.
    Files { images: &'a [PathBuf], masks: &'a [PathBuf] },
    /// In memory: 8-bit images [count, height, width, channels] and masks [count, height, width];
    /// `indices` picks the batch, and `numbers` are its pairs' indices in the caller's dataset
    /// (which errors name: `images` and `masks` may be a copy of the batch alone).
    Pixels {
        images: &'a [u8],
        masks: &'a [u8],
        height: u32,
        width: u32,
        channels: u8,
        indices: &'a [u32],
        numbers: &'a [u32],
    },
}

impl PairSources<'_> {
    fn len(&self) -> usize {
        match self {
            PairSources::Files { images, .. } => images.len(),
            PairSources::Pixels { indices, .. } => indices.len(),
        }
    }

    fn describe_mask(&self, i: usize) -> String {
        match self {
            PairSources::Files { masks, .. } => masks[i].display().to_string(),
            PairSources::Pixels { numbers, .. } => format!("the mask of pair {}", numbers[i]),
        }
    }
}

/// How stored mask values become class ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaskSpec {
    pub num_labels: u32,
    pub ignore_index: u8,
    /// ADE20K's convention: 0 ("other") becomes the ignore index and every other id moves down
    /// by one (mmseg's `reduce_zero_label`).
    #[serde(default)]
    pub reduce_zero_label: bool,
}

impl MaskSpec {
    pub fn validate(&self) -> Result<()> {
        if self.num_labels == 0 || self.num_labels > self.ignore_index as u32 {
            return Err(Error::Config(format!(
                "masks: numLabels must be in [1, {}] (below the ignore index {}), got {}",
                self.ignore_index, self.ignore_index, self.num_labels
            )));
        }
        Ok(())
    }

    /// The class id of a stored value, or `Err(value)` when it is neither a class nor ignored.
    fn class_of(&self, stored: u16) -> std::result::Result<u8, u16> {
        let id = if self.reduce_zero_label {
            match stored {
                0 => return Ok(self.ignore_index),
                v if v == self.ignore_index as u16 => return Ok(self.ignore_index),
                v => v - 1,
            }
        } else {
            stored
        };
        if id == self.ignore_index as u16 || (id as u32) < self.num_labels {
            Ok(id as u8)
        } else {
            Err(stored)
        }
    }
}

/// mmseg's `RandomResize` with `keep_ratio`: the target is `scale * ratio`, truncated to whole
/// pixels as mmseg does, and the image is scaled by `min(target[0] / long side, target[1] / short
/// side)`, whatever its orientation; with `fit`, by `min(target[0] / height, target[1] / width)`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rescale {
    /// [long side, short side] at ratio 1, e.g. [2048, 512] for ADE20K; with `fit`, [height,
    /// width] of a box.
    pub scale: [f64; 2],
    pub ratio: f64,
    /// The image fits the box `scale` in its own orientation (evaluation at a non-square
    /// input, where the long/short rule would let a portrait image overflow a landscape view).
    #[serde(default)]
    pub fit: bool,
}

impl Rescale {
    fn factor(&self, width: u32, height: u32) -> f64 {
        let (first, second) =
            if self.fit { (height as f64, width as f64) } else { (width.max(height) as f64, width.min(height) as f64) };
        let target = self.scale.map(|s| (s * self.ratio).trunc());
        (target[0] / first).min(target[1] / second)
    }
}

/// mmseg's `PhotoMetricDistortion` steps, on 0..255 values, each clamped to that range.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum Photometric {
    /// Adds `delta`.
    Brightness { delta: f32 },
    /// Multiplies by `alpha` (mmseg's contrast has no pivot).
    Contrast { alpha: f32 },
    /// Multiplies the HSV saturation by `alpha` (colour images only).
    Saturation { alpha: f32 },
    /// Shifts the HSV hue by `delta` in OpenCV's 8-bit units of 2 degrees (colour images only).
    Hue { delta: f32 },
}

/// The drawn random parameters for one pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PairAugment {
    /// None: the image's own size.
    #[serde(default)]
    pub rescale: Option<Rescale>,
    /// Crop positions as uniforms [y, x] in [0, 1): the offset along an axis is
    /// floor(u * (margin + 1)). They are tried in order until a crop holds two labelled classes
    /// and its largest covers less than `catMaxRatio` of its labelled pixels; otherwise the last
    /// is kept (mmseg's `RandomCrop` draws 11). Empty: a centred window. Images smaller than the window are padded below and right.
    #[serde(default)]
    pub crop: Vec<[f64; 2]>,
    #[serde(default = "no_cap")]
    pub cat_max_ratio: f64,
    #[serde(default)]
    pub flip: bool,
    /// Applied in this order.
    #[serde(default)]
    pub photometric: Vec<Photometric>,
}

fn no_cap() -> f64 {
    1.0
}

impl PairAugment {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("pair augment: {msg}")));
        if let Some(r) = &self.rescale {
            if !(r.scale.iter().all(|s| *s > 0.0 && s.is_finite()) && r.ratio > 0.0 && r.ratio.is_finite()) {
                return bad(format!("rescale needs a positive scale and ratio, got {:?} and {}", r.scale, r.ratio));
            }
        }
        if let Some(p) = self.crop.iter().find(|p| p.iter().any(|u| !(0.0..1.0).contains(u))) {
            return bad(format!("crop position {p:?} must lie in [0, 1)"));
        }
        if !(self.cat_max_ratio > 0.0 && self.cat_max_ratio <= 1.0) {
            return bad(format!("catMaxRatio must be in (0, 1], got {}", self.cat_max_ratio));
        }
        for op in &self.photometric {
            let (Photometric::Brightness { delta: v }
            | Photometric::Contrast { alpha: v }
            | Photometric::Saturation { alpha: v }
            | Photometric::Hue { delta: v }) = *op;
            if !v.is_finite() {
                return bad(format!("photometric parameter must be finite, got {v}"));
            }
        }
        Ok(())
    }
}

/// The kept pairs, in request order.
pub struct PairBatch {
    /// [kept, C, H, W] normalised pixels.
    pub pixels: Vec<f32>,
    /// [kept, H, W] class ids or the ignore index.
    pub masks: Vec<u8>,
    /// Request positions of the pairs in `pixels` and `masks`.
    pub kept: Vec<u32>,
    pub failures: Vec<Failure>,
}

/// Why one pair did not make it: skipped with the reason, or a mask value that is no class,
/// which ends the batch (a wrong `numLabels` or an unreduced ADE20K mask, not a bad file).
enum PairError {
    Skip(String),
    Fatal(String),
}

/// One pair's normalised pixels and class ids, or why not.
type PairResult = std::result::Result<(Vec<f32>, Vec<u8>), PairError>;

impl From<String> for PairError {
    fn from(reason: String) -> Self {
        PairError::Skip(reason)
    }
}

/// The sources' own consistency: one mask per image, whole images, indices in range.
fn check_sources(sources: &PairSources) -> Result<()> {
    match sources {
        PairSources::Files { images, masks } if images.len() != masks.len() => {
            return Err(Error::Config(format!(
                "{} images but {} masks; expected one mask per image",
                images.len(),
                masks.len()
            )));
        }
        PairSources::Pixels { images, masks, height, width, channels, indices, numbers } => {
            let plane = *height as usize * *width as usize;
            let per = plane * *channels as usize;
            if numbers.len() != indices.len() {
                return Err(Error::Config(format!(
                    "{} pair numbers for {} indices; expected one each",
                    numbers.len(),
                    indices.len()
                )));
            }
            if per == 0 || images.len() % per != 0 || (*channels != 1 && *channels != 3) {
                return Err(Error::Config(format!(
                    "pixel source of {} bytes is not a whole number of {height}x{width}x{channels} images (channels 1 or 3)",
                    images.len()
                )));
            }
            let count = images.len() / per;
            if masks.len() != count * plane {
                return Err(Error::Config(format!(
                    "{} mask bytes for {count} images of {height}x{width}; expected {}",
                    masks.len(),
                    count * plane
                )));
            }
            if let Some(bad) = indices.iter().find(|&&i| i as usize >= count) {
                return Err(Error::Config(format!("pair index {bad} is out of range: the source holds {count} pairs")));
            }
        }
        PairSources::Files { .. } => {}
    }
    Ok(())
}

/// Decodes, augments and normalises a batch of pairs into `view.size` crops.
pub fn load_pairs(
    pool: &ThreadPool,
    sources: &PairSources,
    augments: &[PairAugment],
    view: &ViewSpec,
    masks: &MaskSpec,
    max_pixels: u64,
) -> Result<PairBatch> {
    view.validate()?;
    view.check_budget(max_pixels)?;
    masks.validate()?;
    if augments.len() != sources.len() {
        return Err(Error::Config(format!(
            "{} augment entries for {} pairs; expected one per pair",
            augments.len(),
            sources.len()
        )));
    }
    for augment in augments {
        augment.validate()?;
    }
    check_sources(sources)?;

    let [h, w] = view.size;
    let (pixel_len, mask_len) = (view.values_per_image(), h as usize * w as usize);
    let per_pair: Vec<PairResult> = pool.install(|| {
        (0..sources.len())
            .into_par_iter()
            .map_init(Resizer::new, |resizer, i| {
                let mut pixels = vec![0.0; pixel_len];
                let mut mask = vec![masks.ignore_index; mask_len];
                load_pair(sources, i, &augments[i], view, masks, max_pixels, resizer, &mut pixels, &mut mask)?;
                Ok((pixels, mask))
            })
            .collect()
    });

    let mut batch = PairBatch { pixels: vec![], masks: vec![], kept: vec![], failures: vec![] };
    for (i, result) in per_pair.into_iter().enumerate() {
        match result {
            Ok((pixels, mask)) => {
                batch.pixels.extend_from_slice(&pixels);
                batch.masks.extend_from_slice(&mask);
                batch.kept.push(i as u32);
            }
            Err(PairError::Skip(reason)) => batch.failures.push(Failure { index: i as u32, reason }),
            Err(PairError::Fatal(reason)) => return Err(Error::Input(reason)),
        }
    }
    Ok(batch)
}

/// One pair for whole-image (sliding-window) evaluation, as mmseg tests: the image rescaled
/// keeping its ratio and normalised, and the mask at its original size.
pub struct WholePair {
    /// [C, height, width] normalised.
    pub pixels: Vec<f32>,
    /// [height, width] of `pixels`.
    pub size: [u32; 2],
    /// Class ids (or the ignore index) at the original size.
    pub mask: Vec<u8>,
    /// [height, width] of `mask`.
    pub mask_size: [u32; 2],
}

/// The kept whole pairs, in request order.
pub struct WholePairBatch {
    pub pairs: Vec<WholePair>,
    pub kept: Vec<u32>,
    pub failures: Vec<Failure>,
}

/// Reads pairs for evaluation: each image rescaled by `rescale` (None: its own size) with the
/// view's filter, channels and normalisation (the view's size is not used), each mask as stored.
pub fn load_whole_pairs(
    pool: &ThreadPool,
    sources: &PairSources,
    rescale: Option<Rescale>,
    view: &ViewSpec,
    masks: &MaskSpec,
    max_pixels: u64,
) -> Result<WholePairBatch> {
    view.validate()?;
    masks.validate()?;
    check_sources(sources)?;
    let plain = PairAugment { rescale, crop: vec![], cat_max_ratio: 1.0, flip: false, photometric: vec![] };
    plain.validate()?;
    let per_pair: Vec<std::result::Result<WholePair, PairError>> = pool.install(|| {
        (0..sources.len())
            .into_par_iter()
            .map_init(Resizer::new, |resizer, i| {
                let (image, full, mask) = read_pair(sources, i, rescale, masks, max_pixels)?;
                let (w, h) = rescaled_size(full, rescale, max_pixels)?;
                let sized = ViewSpec { size: [h, w], ..view.clone() };
                let image = resize_image(&image, w, h, &sized, resizer)?;
                let mut pixels = vec![0.0; sized.values_per_image()];
                let mut scratch = vec![0; (w * h) as usize];
                let blank = Mask { width: w, height: h, ids: scratch.clone() };
                write_pair(&image, &blank, 0, 0, h, w, &plain, &sized, &mut pixels, &mut scratch);
                Ok(WholePair { pixels, size: [h, w], mask: mask.ids, mask_size: [mask.height, mask.width] })
            })
            .collect()
    });
    let mut batch = WholePairBatch { pairs: vec![], kept: vec![], failures: vec![] };
    for (i, result) in per_pair.into_iter().enumerate() {
        match result {
            Ok(pair) => {
                batch.pairs.push(pair);
                batch.kept.push(i as u32);
            }
            Err(PairError::Skip(reason)) => batch.failures.push(Failure { index: i as u32, reason }),
            Err(PairError::Fatal(reason)) => return Err(Error::Input(reason)),
        }
    }
    Ok(batch)
}

/// A mask of class ids, row-major.
struct Mask {
    width: u32,
    height: u32,
    ids: Vec<u8>,
}

/// Reads pair `i`: the decoded image (possibly downscaled while decoding, when `rescale`
/// shrinks it), its full-resolution size, and its mask of class ids at that size.
fn read_pair(
    sources: &PairSources,
    i: usize,
    rescale: Option<Rescale>,
    spec: &MaskSpec,
    max_pixels: u64,
) -> std::result::Result<(Pixels, (u32, u32), Mask), PairError> {
    let (image, full, mask) = match sources {
        PairSources::Files { images, masks } => {
            let mask_bytes =
                std::fs::read(&masks[i]).map_err(|e| format!("cannot read mask {}: {e}", masks[i].display()))?;
            let (width, height, stored) =
                decode_mask(&mask_bytes).map_err(|e| format!("mask {}: {e}", masks[i].display()))?;
            let mask = to_classes(&stored, spec, &sources.describe_mask(i))?;
            let bytes = std::fs::read(&images[i]).map_err(|e| format!("cannot read image: {e}"))?;
            let factor = |w: u32, h: u32| rescale.map_or(1.0, |r| r.factor(w, h));
            let request = |w: u32, h: u32| (scaled(w, factor(w, h)), scaled(h, factor(w, h)));
            let decoded = decode(&bytes, max_pixels, &request)?;
            (decoded.pixels, (decoded.full_width, decoded.full_height), Mask { width, height, ids: mask })
        }
        PairSources::Pixels { images, masks, height, width, channels, indices, .. } => {
            let plane = *height as usize * *width as usize;
            let k = indices[i] as usize;
            let per = plane * *channels as usize;
            let pixels = Pixels::new(*width, *height, *channels, images[k * per..(k + 1) * per].to_vec());
            let ids = to_classes(
                &masks[k * plane..(k + 1) * plane].iter().map(|&v| v as u16).collect::<Vec<_>>(),
                spec,
                &sources.describe_mask(i),
            )?;
            (pixels, (*width, *height), Mask { width: *width, height: *height, ids })
        }
    };
    if full != (mask.width, mask.height) {
        return Err(PairError::Skip(format!(
            "the mask is {}x{} but the image {}x{} (width x height); expected equal sizes",
            mask.width, mask.height, full.0, full.1
        )));
    }
    Ok((image, full, mask))
}

#[allow(clippy::too_many_arguments)]
fn load_pair(
    sources: &PairSources,
    i: usize,
    augment: &PairAugment,
    view: &ViewSpec,
    spec: &MaskSpec,
    max_pixels: u64,
    resizer: &mut Resizer,
    out_pixels: &mut [f32],
    out_mask: &mut [u8],
) -> std::result::Result<(), PairError> {
    let (image, full, mask) = read_pair(sources, i, augment.rescale, spec, max_pixels)?;

    // Rescale: both to the target size computed from the full-resolution size.
    let (tw, th) = rescaled_size(full, augment.rescale, max_pixels)?;
    let image = resize_image(&image, tw, th, view, resizer)?;
    let mask = resize_nearest(&mask, tw, th);

    // Crop: the offset of a view-sized window (smaller images are padded, not scaled up).
    let [ch, cw] = view.size;
    let (margin_y, margin_x) = (th.saturating_sub(ch), tw.saturating_sub(cw));
    let offset =
        |p: [f64; 2]| ((p[0] * (margin_y + 1) as f64).floor() as u32, (p[1] * (margin_x + 1) as f64).floor() as u32);
    let (crop_h, crop_w) = (ch.min(th), cw.min(tw));
    let (top, left) = if augment.crop.is_empty() {
        (margin_y / 2, margin_x / 2)
    } else {
        let fits = |(top, left): (u32, u32)| {
            augment.cat_max_ratio >= 1.0
                || balanced(&mask, top, left, crop_h, crop_w, spec.ignore_index, augment.cat_max_ratio)
        };
        let tried = augment.crop.iter().map(|&p| offset(p));
        let last = offset(*augment.crop.last().expect("not empty"));
        tried.take(augment.crop.len() - 1).find(|&o| fits(o)).unwrap_or(last)
    };

    write_pair(&image, &mask, top, left, crop_h, crop_w, augment, view, out_pixels, out_mask);
    Ok(())
}

/// The size an image of `full` pixels is rescaled to, refused past the decode budget: a `scale`
/// far above the images' would ask for more memory than there is, and that aborts the process.
fn rescaled_size(
    full: (u32, u32),
    rescale: Option<Rescale>,
    max_pixels: u64,
) -> std::result::Result<(u32, u32), PairError> {
    let factor = rescale.map_or(1.0, |r| r.factor(full.0, full.1));
    let (w, h) = (scaled(full.0, factor), scaled(full.1, factor));
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(format!(
            "rescaled to {w}x{h} ({}), past the budget of {} an image (maxPixels)",
            describe_pixels(pixels),
            describe_pixels(max_pixels)
        )
        .into());
    }
    Ok((w, h))
}

fn scaled(side: u32, factor: f64) -> u32 {
    ((side as f64 * factor + 0.5) as u32).max(1)
}

/// Stored mask values -> class ids; a value that is neither a class nor ignored is fatal.
fn to_classes(stored: &[u16], spec: &MaskSpec, what: &str) -> std::result::Result<Vec<u8>, PairError> {
    stored
        .iter()
        .map(|&v| spec.class_of(v))
        .collect::<std::result::Result<Vec<u8>, u16>>()
        .map_err(|value| {
            let reduced = if spec.reduce_zero_label { " (after reduceZeroLabel: stored value - 1)" } else { "" };
            PairError::Fatal(format!(
                "{what} holds the value {value}, which is no class id{reduced}: expected ids below numLabels {} or the ignore index {}",
                spec.num_labels, spec.ignore_index
            ))
        })
}

/// A PNG mask -> (width, height, stored values). Grayscale and palette PNGs of any bit depth
/// keep their raw values (for a palette, the index); colour masks are refused.
fn decode_mask(bytes: &[u8]) -> std::result::Result<(u32, u32, Vec<u16>), String> {
    if !bytes.starts_with(b"\x89PNG") {
        return Err("masks must be PNG files (lossless class ids)".into());
    }
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| format!("invalid PNG: {e}"))?;
    let info = reader.info();
    let (width, height, color, depth) = (info.width, info.height, info.color_type, info.bit_depth);
    if !matches!(color, png::ColorType::Grayscale | png::ColorType::Indexed) {
        return Err(format!(
            "a {color:?} PNG cannot be a mask: expected one channel of class ids (grayscale or palette)"
        ));
    }
    let mut buf = vec![0; reader.output_buffer_size().ok_or("PNG too large")?];
    let frame = reader.next_frame(&mut buf).map_err(|e| format!("corrupt or truncated PNG: {e}"))?;
    let bits = depth as usize;
    let mut values = Vec::with_capacity(width as usize * height as usize);
    for row in buf[..frame.buffer_size()].chunks_exact(frame.line_size) {
        for x in 0..width as usize {
            values.push(match bits {
                16 => u16::from_be_bytes([row[2 * x], row[2 * x + 1]]),
                8 => row[x] as u16,
                _ => {
                    let per_byte = 8 / bits;
                    let shift = 8 - bits * (x % per_byte + 1);
                    ((row[x / per_byte] >> shift) & ((1 << bits) - 1) as u8) as u16
                }
            });
        }
    }
    Ok((width, height, values))
}

fn resize_image(
    image: &Pixels,
    w: u32,
    h: u32,
    view: &ViewSpec,
    resizer: &mut Resizer,
) -> std::result::Result<Pixels, String> {
    if (image.width, image.height) == (w, h) {
        return Ok(Pixels::new(w, h, image.channels, image.data.clone()));
    }
    let pixel_type = if image.channels == 3 { PixelType::U8x3 } else { PixelType::U8 };
    let src = ImageRef::new(image.width, image.height, &image.data, pixel_type).map_err(|e| e.to_string())?;
    let mut dst = Image::new(w, h, pixel_type);
    let options = ResizeOptions::new().resize_alg(view.interpolation.algorithm());
    resizer.resize(&src, &mut dst, &options).map_err(|e| format!("resize failed: {e}"))?;
    Ok(Pixels::new(w, h, image.channels, dst.into_vec()))
}

/// OpenCV's INTER_NEAREST (as mmseg resizes masks): source index floor(dst * src / dst_size).
fn resize_nearest(mask: &Mask, w: u32, h: u32) -> Mask {
    if (mask.width, mask.height) == (w, h) {
        return Mask { width: w, height: h, ids: mask.ids.clone() };
    }
    let pick = |d: u32, dst: u32, src: u32| ((d as u64 * src as u64) / dst as u64).min(src as u64 - 1) as usize;
    let xs: Vec<usize> = (0..w).map(|x| pick(x, w, mask.width)).collect();
    let mut ids = Vec::with_capacity(w as usize * h as usize);
    for y in 0..h {
        let row = pick(y, h, mask.height) * mask.width as usize;
        ids.extend(xs.iter().map(|&x| mask.ids[row + x]));
    }
    Mask { width: w, height: h, ids }
}

/// mmseg's `cat_max_ratio` test: at least two labelled classes, the largest under `cap` of the
/// labelled pixels.
fn balanced(mask: &Mask, top: u32, left: u32, h: u32, w: u32, ignore: u8, cap: f64) -> bool {
    let mut counts = [0u64; 256];
    for y in top..top + h {
        let row = (y * mask.width) as usize;
        for &id in &mask.ids[row + left as usize..row + (left + w) as usize] {
            counts[id as usize] += 1;
        }
    }
    counts[ignore as usize] = 0;
    let classes = counts.iter().filter(|&&c| c > 0).count();
    let total: u64 = counts.iter().sum();
    classes > 1 && (*counts.iter().max().expect("256 bins") as f64) < cap * total as f64
}

/// The crop -> flip -> photometric distortion -> channel conversion -> normalisation, written
/// top-left into the view-sized outputs (the rest keeps its padding).
#[allow(clippy::too_many_arguments)]
fn write_pair(
    image: &Pixels,
    mask: &Mask,
    top: u32,
    left: u32,
    h: u32,
    w: u32,
    augment: &PairAugment,
    view: &ViewSpec,
    out_pixels: &mut [f32],
    out_mask: &mut [u8],
) {
    let [_, out_w] = view.size;
    let plane = view.size[0] as usize * out_w as usize;
    let (src_c, out_c) = (image.channels as usize, view.channels as usize);
    for y in 0..h as usize {
        for x in 0..w as usize {
            let sx = left as usize + if augment.flip { w as usize - 1 - x } else { x };
            let sy = top as usize + y;
            let at = y * out_w as usize + x;
            out_mask[at] = mask.ids[sy * mask.width as usize + sx];
            let s = &image.data[(sy * image.width as usize + sx) * src_c..][..src_c];
            let mut rgb = if src_c == 3 { [s[0] as f32, s[1] as f32, s[2] as f32] } else { [s[0] as f32; 3] };
            for op in &augment.photometric {
                rgb = distort(rgb, *op, src_c == 3);
            }
            if out_c == 3 {
                for c in 0..3 {
                    out_pixels[c * plane + at] = (rgb[c] / 255.0 - view.mean[c]) / view.std[c];
                }
            } else {
                let g = if src_c == 3 { 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] } else { rgb[0] };
                out_pixels[at] = (g / 255.0 - view.mean[0]) / view.std[0];
            }
        }
    }
}

/// One photometric step on a pixel of 0..255 values; saturation and hue leave gray pixels of a
/// gray image alone (they have neither).
pub fn distort(rgb: [f32; 3], op: Photometric, colour: bool) -> [f32; 3] {
    match op {
        Photometric::Brightness { delta } => rgb.map(|v| (v + delta).clamp(0.0, 255.0)),
        Photometric::Contrast { alpha } => rgb.map(|v| (v * alpha).clamp(0.0, 255.0)),
        Photometric::Saturation { alpha } if colour => {
            let [hue, s, v] = to_hsv(rgb);
            from_hsv([hue, (s * alpha).clamp(0.0, 1.0), v])
        }
        Photometric::Hue { delta } if colour => {
            let [hue, s, v] = to_hsv(rgb);
            from_hsv([(hue + 2.0 * delta).rem_euclid(360.0), s, v])
        }
        Photometric::Saturation { .. } | Photometric::Hue { .. } => rgb,
    }
}

/// RGB (0..255) -> [hue in degrees, saturation 0..1, value 0..255].
fn to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    [h, s, max]
}

fn from_hsv([h, s, v]: [f32; 3]) -> [f32; 3] {
    let c = v * s;
    let hp = h / 60.0;
    let x = c * (1.0 - (hp.rem_euclid(2.0) - 1.0).abs());
    let [r, g, b] = match hp as u32 {
        0 => [c, x, 0.0],
        1 => [x, c, 0.0],
        2 => [0.0, c, x],
        3 => [0.0, x, c],
        4 => [x, 0.0, c],
        _ => [c, 0.0, x],
    };
    let m = v - c;
    [r + m, g + m, b + m].map(|u| u.clamp(0.0, 255.0))
}
