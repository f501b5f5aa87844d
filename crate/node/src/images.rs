//! The image loader: decodes and augments batches on a thread pool.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use beit_core::images::{
    load_pairs, load_views, load_whole_pairs, Augment, Failure, MaskSpec, PairAugment, PairBatch, PairSources, Rescale,
    Sources, ViewBatch, ViewSpec, WholePairBatch, DEFAULT_MAX_PIXELS,
};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use rayon::ThreadPool;

use crate::guarded;

/// Decodes, crops, resizes and normalises image batches on the process's pool of its size.
#[napi]
pub struct NativeImageLoader {
    pool: Arc<ThreadPool>,
    max_pixels: u64,
}

#[napi(object)]
pub struct ImageFailure {
    /// Position of the image in the request.
    pub index: u32,
    pub reason: String,
}

#[napi(object)]
pub struct NativeViewBatch {
    /// One [kept, C, H, W] array per requested view.
    pub views: Vec<Float32Array>,
    /// Request positions of the images that made it into `views`, ascending.
    pub kept: Uint32Array,
    pub failures: Vec<ImageFailure>,
}

#[napi(object)]
pub struct NativePairBatch {
    /// [kept, C, H, W] normalised pixels.
    pub pixels: Float32Array,
    /// [kept, H, W] class ids (or the ignore index).
    pub masks: Uint8Array,
    /// Request positions of the pairs that made it into the batch, ascending.
    pub kept: Uint32Array,
    pub failures: Vec<ImageFailure>,
}

#[napi]
impl NativeImageLoader {
    /// `threads`: pool size (default: the machine's available parallelism). `maxPixels`: decoded
    /// pixels allowed per image (default 64 Mi); larger JPEGs are downscaled while decoding.
    #[napi(constructor)]
    pub fn new(threads: Option<u32>, max_pixels: Option<f64>) -> Result<Self> {
        let threads = match threads {
            Some(0) => return Err(Error::new(Status::InvalidArg, "threads must be at least 1, got 0")),
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let max_pixels = match max_pixels {
            Some(n) if !(n >= 1.0 && n.is_finite()) => {
                return Err(Error::new(Status::InvalidArg, format!("maxPixels must be a positive number, got {n}")))
            }
            Some(n) => n as u64,
            None => DEFAULT_MAX_PIXELS,
        };
        Ok(Self { pool: shared_pool(threads)?, max_pixels })
    }

    #[napi(getter)]
    pub fn threads(&self) -> u32 {
        self.pool.current_num_threads() as u32
    }

    /// Reads and decodes image files. `augmentsJson`: one drawn augmentation per path;
    /// `viewsJson`: the view specs.
    #[napi(ts_return_type = "Promise<NativeViewBatch>")]
    pub fn load_files(
        &self,
        paths: Vec<String>,
        augments_json: String,
        views_json: String,
    ) -> AsyncTask<LoadViewsTask> {
        let source = Source::Files(paths.into_iter().map(PathBuf::from).collect());
        AsyncTask::new(LoadViewsTask { loader: self.task_context(), source, augments_json, views_json })
    }

    /// Views of decoded 8-bit images stored [count, height, width, channels] in `pixels`
    /// (an IDX dataset); `indices` picks the batch.
    #[napi(ts_return_type = "Promise<NativeViewBatch>")]
    #[allow(clippy::too_many_arguments)]
    pub fn load_pixels(
        &self,
        pixels: Uint8Array,
        height: u32,
        width: u32,
        channels: u32,
        indices: Uint32Array,
        augments_json: String,
        views_json: String,
    ) -> Result<AsyncTask<LoadViewsTask>> {
        let channels = u8::try_from(channels)
            .map_err(|_| Error::new(Status::InvalidArg, format!("channels must be 1 or 3, got {channels}")))?;
        let per = image_values(height, width, u32::from(channels))?;
        let (pixels, indices) = gather(&pixels, per, &indices, "images")?;
        let source = Source::Pixels { pixels, height, width, channels, indices };
        Ok(AsyncTask::new(LoadViewsTask { loader: self.task_context(), source, augments_json, views_json }))
    }
}

/// One evaluation pair: the rescaled image and the mask as stored.
#[napi(object)]
pub struct NativeWholePair {
    /// [C, height, width] normalised.
    pub pixels: Float32Array,
    /// [height, width] of `pixels`.
    pub size: Vec<u32>,
    pub mask: Uint8Array,
    /// [height, width] of `mask`.
    pub mask_size: Vec<u32>,
}

#[napi(object)]
pub struct NativeWholePairBatch {
    pub pairs: Vec<NativeWholePair>,
    pub kept: Uint32Array,
    pub failures: Vec<ImageFailure>,
}

#[napi]
impl NativeImageLoader {
    /// Pairs for whole-image evaluation: each image rescaled by `rescaleJson` (null: as it is)
    /// and normalised as `viewJson` says (its size unused), each mask at its stored size.
    #[napi(ts_return_type = "Promise<NativeWholePairBatch>")]
    pub fn load_whole_pairs(
        &self,
        images: Vec<String>,
        masks: Vec<String>,
        rescale_json: String,
        view_json: String,
        masks_json: String,
    ) -> AsyncTask<LoadWholePairsTask> {
        AsyncTask::new(LoadWholePairsTask {
            loader: self.task_context(),
            images: images.into_iter().map(PathBuf::from).collect(),
            masks: masks.into_iter().map(PathBuf::from).collect(),
            rescale_json,
            view_json,
            masks_json,
        })
    }

    /// Image files with PNG masks of class ids, augmented together. `augmentsJson`: one drawn
    /// pair augmentation per image; `viewJson`: the output view; `masksJson`: how mask values
    /// become ids. A mask value that is no class rejects the whole batch, naming the file.
    #[napi(ts_return_type = "Promise<NativePairBatch>")]
    pub fn load_pair_files(
        &self,
        images: Vec<String>,
        masks: Vec<String>,
        augments_json: String,
        view_json: String,
        masks_json: String,
    ) -> AsyncTask<LoadPairsTask> {
        let source = PairSource::Files {
            images: images.into_iter().map(PathBuf::from).collect(),
            masks: masks.into_iter().map(PathBuf::from).collect(),
        };
        AsyncTask::new(LoadPairsTask { loader: self.task_context(), source, augments_json, view_json, masks_json })
    }

    /// In-memory pairs: 8-bit images [count, height, width, channels] and masks
    /// [count, height, width]; `indices` picks the batch.
    #[napi(ts_return_type = "Promise<NativePairBatch>")]
    #[allow(clippy::too_many_arguments)]
    pub fn load_pair_pixels(
        &self,
        images: Uint8Array,
        masks: Uint8Array,
        height: u32,
        width: u32,
        channels: u32,
        indices: Uint32Array,
        augments_json: String,
        view_json: String,
        masks_json: String,
    ) -> Result<AsyncTask<LoadPairsTask>> {
        let channels = u8::try_from(channels)
            .map_err(|_| Error::new(Status::InvalidArg, format!("channels must be 1 or 3, got {channels}")))?;
        let (images, _) = gather(&images, image_values(height, width, u32::from(channels))?, &indices, "images")?;
        let (masks, positions) = gather(&masks, image_values(height, width, 1)?, &indices, "masks")?;
        let source =
            PairSource::Pixels { images, masks, height, width, channels, positions, numbers: indices.to_vec() };
        Ok(AsyncTask::new(LoadPairsTask { loader: self.task_context(), source, augments_json, view_json, masks_json }))
    }
}

/// The live pool of `threads` threads, or a new one. Loaders share pools: a loop makes a loader
/// per evaluation, and a pool of its own each time would keep its idle threads until the garbage
/// collector happened to drop the loader.
fn shared_pool(threads: usize) -> Result<Arc<ThreadPool>> {
    static POOLS: Mutex<Option<HashMap<usize, Weak<ThreadPool>>>> = Mutex::new(None);
    let mut pools = POOLS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let pools = pools.get_or_insert_with(HashMap::new);
    if let Some(pool) = pools.get(&threads).and_then(Weak::upgrade) {
        return Ok(pool);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("beit-images-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::new(Status::GenericFailure, format!("cannot start the image thread pool: {e}")))?;
    pools.insert(threads, Arc::downgrade(&pool));
    Ok(pool)
}

impl NativeImageLoader {
    fn task_context(&self) -> (Arc<ThreadPool>, u64) {
        (self.pool.clone(), self.max_pixels)
    }
}

/// Values of one height x width x channels image, or an error when that overflows.
fn image_values(height: u32, width: u32, channels: u32) -> Result<usize> {
    (height as usize).checked_mul(width as usize).and_then(|v| v.checked_mul(channels as usize)).ok_or_else(|| {
        Error::new(Status::InvalidArg, format!("an image of {height}x{width}x{channels} values is too large"))
    })
}

/// The images `indices` picks from `data` ([count, per] values), copied on the JS thread, and
/// their positions in the copy: the task must not read the caller's buffer after this call
/// returns (it may be refilled or transferred meanwhile), and a batch is small to copy where
/// the whole in-memory dataset would not be.
fn gather(data: &[u8], per: usize, indices: &[u32], what: &str) -> Result<(Vec<u8>, Vec<u32>)> {
    let count = data.len().checked_div(per).unwrap_or(0);
    let mut out = Vec::with_capacity(indices.len().saturating_mul(per));
    for &i in indices {
        let i = i as usize;
        if i >= count {
            return Err(Error::new(Status::InvalidArg, format!("{what}: index {i} is outside the {count} stored")));
        }
        out.extend_from_slice(&data[i * per..(i + 1) * per]);
    }
    Ok((out, (0..indices.len() as u32).collect()))
}

pub enum Source {
    Files(Vec<PathBuf>),
    Pixels { pixels: Vec<u8>, height: u32, width: u32, channels: u8, indices: Vec<u32> },
}

pub struct LoadViewsTask {
    loader: (Arc<ThreadPool>, u64),
    source: Source,
    augments_json: String,
    views_json: String,
}

impl Task for LoadViewsTask {
    type Output = ViewBatch;
    type JsValue = NativeViewBatch;

    fn compute(&mut self) -> Result<ViewBatch> {
        guarded(|| {
            let augments: Vec<Augment> = beit_core::config::parse_json("augments", &self.augments_json)?;
            let views: Vec<ViewSpec> = beit_core::config::parse_json("views", &self.views_json)?;
            let (pool, max_pixels) = &self.loader;
            let sources = match &self.source {
                Source::Files(paths) => Sources::Files(paths),
                Source::Pixels { pixels, height, width, channels, indices } => {
                    Sources::Pixels { data: pixels, height: *height, width: *width, channels: *channels, indices }
                }
            };
            load_views(pool, &sources, &augments, &views, *max_pixels)
        })
    }

    fn resolve(&mut self, _: Env, batch: ViewBatch) -> Result<NativeViewBatch> {
        Ok(NativeViewBatch {
            views: batch.views.into_iter().map(Float32Array::new).collect(),
            kept: Uint32Array::new(batch.kept),
            failures: failures(batch.failures),
        })
    }
}

// One per batch request: the variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum PairSource {
    Files {
        images: Vec<PathBuf>,
        masks: Vec<PathBuf>,
    },
    /// The batch's pairs copied (`positions` in the copy), and their indices in the caller's data.
    Pixels {
        images: Vec<u8>,
        masks: Vec<u8>,
        height: u32,
        width: u32,
        channels: u8,
        positions: Vec<u32>,
        numbers: Vec<u32>,
    },
}

pub struct LoadPairsTask {
    loader: (Arc<ThreadPool>, u64),
    source: PairSource,
    augments_json: String,
    view_json: String,
    masks_json: String,
}

impl Task for LoadPairsTask {
    type Output = PairBatch;
    type JsValue = NativePairBatch;

    fn compute(&mut self) -> Result<PairBatch> {
        guarded(|| {
            let augments: Vec<PairAugment> = beit_core::config::parse_json("augments", &self.augments_json)?;
            let view: ViewSpec = beit_core::config::parse_json("view", &self.view_json)?;
            let masks: MaskSpec = beit_core::config::parse_json("masks", &self.masks_json)?;
            let (pool, max_pixels) = &self.loader;
            let sources = match &self.source {
                PairSource::Files { images, masks } => PairSources::Files { images, masks },
                PairSource::Pixels { images, masks, height, width, channels, positions, numbers } => {
                    PairSources::Pixels {
                        images,
                        masks,
                        height: *height,
                        width: *width,
                        channels: *channels,
                        indices: positions,
                        numbers,
                    }
                }
            };
            load_pairs(pool, &sources, &augments, &view, &masks, *max_pixels)
        })
    }

    fn resolve(&mut self, _: Env, batch: PairBatch) -> Result<NativePairBatch> {
        Ok(NativePairBatch {
            pixels: Float32Array::new(batch.pixels),
            masks: Uint8Array::new(batch.masks),
            kept: Uint32Array::new(batch.kept),
            failures: failures(batch.failures),
        })
    }
}

fn failures(list: Vec<Failure>) -> Vec<ImageFailure> {
    list.into_iter().map(|f| ImageFailure { index: f.index, reason: f.reason }).collect()
}

pub struct LoadWholePairsTask {
    loader: (Arc<ThreadPool>, u64),
    images: Vec<PathBuf>,
    masks: Vec<PathBuf>,
    rescale_json: String,
    view_json: String,
    masks_json: String,
}

impl Task for LoadWholePairsTask {
    type Output = WholePairBatch;
    type JsValue = NativeWholePairBatch;

    fn compute(&mut self) -> Result<WholePairBatch> {
        guarded(|| {
            let rescale: Option<Rescale> = beit_core::config::parse_json("rescale", &self.rescale_json)?;
            let view: ViewSpec = beit_core::config::parse_json("view", &self.view_json)?;
            let masks: MaskSpec = beit_core::config::parse_json("masks", &self.masks_json)?;
            let (pool, max_pixels) = &self.loader;
            let sources = PairSources::Files { images: &self.images, masks: &self.masks };
            load_whole_pairs(pool, &sources, rescale, &view, &masks, *max_pixels)
        })
    }

    fn resolve(&mut self, _: Env, batch: WholePairBatch) -> Result<NativeWholePairBatch> {
        Ok(NativeWholePairBatch {
            pairs: batch
                .pairs
                .into_iter()
                .map(|p| NativeWholePair {
                    pixels: Float32Array::new(p.pixels),
                    size: p.size.to_vec(),
                    mask: Uint8Array::new(p.mask),
                    mask_size: p.mask_size.to_vec(),
                })
                .collect(),
            kept: Uint32Array::new(batch.kept),
            failures: failures(batch.failures),
        })
    }
}
