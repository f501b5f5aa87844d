//! Views of one image: a crop box shared by every view, each view resized with its own filter,
//! color-jittered, flipped and normalised into planar floats. Random parameters arrive drawn
//! (TypeScript owns the RNG); this module only applies them.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::Deserialize;

use super::decode::Pixels;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    /// Catmull-Rom (a = -0.5), PIL's and torchvision's bicubic.
    Bicubic,
    /// Lanczos with 3 lobes, PIL's LANCZOS.
    Lanczos,
}

impl Interpolation {
    pub(crate) fn algorithm(self) -> ResizeAlg {
        match self {
            Self::Nearest => ResizeAlg::Nearest,
            Self::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Self::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Self::Lanczos => ResizeAlg::Convolution(FilterType::Lanczos3),
        }
    }
}

/// One output of the pipeline, e.g. BEiT's 224 px bicubic patch view or its 112 px Lanczos
/// tokenizer view. Output values are (x - mean[c]) / std[c] with x in [0, 1].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ViewSpec {
    /// [height, width].
    pub size: [u32; 2],
    pub interpolation: Interpolation,
    /// 1 (gray; RGB sources are converted with ITU-R 601 luma) or 3 (gray sources are repeated).
    pub channels: u8,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl ViewSpec {
    pub fn values_per_image(&self) -> usize {
        self.channels as usize * self.size[0] as usize * self.size[1] as usize
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("view: {msg}")));
        if self.size[0] == 0 || self.size[1] == 0 {
            return bad(format!("size must be positive, got {:?}", self.size));
        }
        if self.channels != 1 && self.channels != 3 {
            return bad(format!("channels must be 1 or 3, got {}", self.channels));
        }
        let c = self.channels as usize;
        if self.mean.len() != c || self.std.len() != c {
            return bad(format!(
                "mean and std need one value per channel ({c}), got {} and {}",
                self.mean.len(),
                self.std.len()
            ));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return bad(format!("std values must be positive, got {s}"));
        }
        Ok(())
    }

    /// Refuses a view of more pixels than an image may decode to (`max_pixels`): its batch
    /// buffers are allocated before any image is read, and an allocation past the machine's
    /// memory aborts the process.
    pub fn check_budget(&self, max_pixels: u64) -> Result<()> {
        let [h, w] = self.size;
        if h as u64 * w as u64 > max_pixels {
            return Err(Error::Config(format!(
                "view: size {h}x{w} has more pixels than the decode budget of {max_pixels} an image (maxPixels)"
            )));
        }
        Ok(())
    }
}

/// How the shared crop box is chosen.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum Crop {
    /// torchvision's RandomResizedCrop with its draws made: candidate boxes as
    /// [area share, aspect ratio w/h], tried in order; the first that fits the image is placed
    /// at `position` (two uniforms in [0, 1)). If none fits, the centred box clamped to
    /// `ratioRange` is used, as torchvision falls back.
    #[serde(rename_all = "camelCase")]
    RandomResized { attempts: Vec<[f64; 2]>, position: [f64; 2], ratio_range: [f64; 2] },
    /// Evaluation: the largest centred box of the first view's aspect ratio, scaled by
    /// `fraction` (Resize(224 / 0.875) + CenterCrop(224) is fraction 0.875).
    Center { fraction: f64 },
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum Jitter {
    Brightness { factor: f32 },
    Contrast { factor: f32 },
    Saturation { factor: f32 },
}

/// The drawn random parameters for one image.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Augment {
    pub crop: Crop,
    #[serde(default)]
    pub flip: bool,
    /// Applied in this order (torchvision draws a random order).
    #[serde(default)]
    pub jitter: Vec<Jitter>,
}

impl Augment {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("augment: {msg}")));
        match &self.crop {
            Crop::RandomResized { attempts, position, ratio_range } => {
                if let Some(a) =
                    attempts.iter().find(|a| !(a[0] > 0.0 && a[0] <= 1.0 && a[1] > 0.0 && a[1].is_finite()))
                {
                    return bad(format!(
                        "crop attempt [area {}, ratio {}] needs area in (0, 1] and a positive ratio",
                        a[0], a[1]
                    ));
                }
                if position.iter().any(|p| !(0.0..1.0).contains(p)) {
                    return bad(format!("crop position {position:?} must lie in [0, 1)"));
                }
                if !(ratio_range[0] > 0.0 && ratio_range[0] <= ratio_range[1] && ratio_range[1].is_finite()) {
                    return bad(format!("ratioRange {ratio_range:?} must be positive and ascending"));
                }
            }
            Crop::Center { fraction } => {
                if !(*fraction > 0.0 && *fraction <= 1.0) {
                    return bad(format!("center crop fraction must be in (0, 1], got {fraction}"));
                }
            }
        }
        for j in &self.jitter {
            let (Jitter::Brightness { factor } | Jitter::Contrast { factor } | Jitter::Saturation { factor }) = *j;
            if !(factor.is_finite() && factor >= 0.0) {
                return bad(format!("jitter factor must be finite and non-negative, got {factor}"));
            }
        }
        Ok(())
    }
}

/// A box in the full-resolution upright image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// The crop box for an image of `width` x `height`; `aspect` (w/h) is the first view's, used by
/// the centre crop. Sizes are whole pixels as in torchvision.
pub fn crop_box(crop: &Crop, width: u32, height: u32, aspect: f64) -> CropBox {
    let (w_img, h_img) = (width as f64, height as f64);
    match crop {
        Crop::RandomResized { attempts, position, ratio_range } => {
            let area = w_img * h_img;
            for &[share, ratio] in attempts {
                let w = (area * share * ratio).sqrt().round();
                let h = (area * share / ratio).sqrt().round();
                if w >= 1.0 && h >= 1.0 && w <= w_img && h <= h_img {
                    let left = (position[0] * (w_img - w + 1.0)).floor();
                    let top = (position[1] * (h_img - h + 1.0)).floor();
                    return CropBox { left, top, width: w, height: h };
                }
            }
            let in_ratio = w_img / h_img;
            let (w, h) = if in_ratio < ratio_range[0] {
                (w_img, (w_img / ratio_range[0]).round())
            } else if in_ratio > ratio_range[1] {
                ((h_img * ratio_range[1]).round(), h_img)
            } else {
                (w_img, h_img)
            };
            centred(w_img, h_img, w, h)
        }
        Crop::Center { fraction } => {
            let (w, h) = if w_img / h_img > aspect { (h_img * aspect, h_img) } else { (w_img, w_img / aspect) };
            centred(w_img, h_img, (w * fraction).round().max(1.0), (h * fraction).round().max(1.0))
        }
    }
}

fn centred(w_img: f64, h_img: f64, w: f64, h: f64) -> CropBox {
    CropBox { left: ((w_img - w) / 2.0).floor(), top: ((h_img - h) / 2.0).floor(), width: w, height: h }
}

/// The smallest image size at which `b` still has at least each view's pixels: how far a JPEG
/// may be downscaled while decoding.
pub fn needed_size(b: &CropBox, width: u32, height: u32, views: &[ViewSpec]) -> (u32, u32) {
    let scale = views
        .iter()
        .map(|v| (v.size[1] as f64 / b.width).max(v.size[0] as f64 / b.height))
        .fold(0.0, f64::max)
        .min(1.0);
    ((width as f64 * scale).ceil() as u32, (height as f64 * scale).ceil() as u32)
}

/// ITU-R 601 luma, as PIL's `convert("L")` and torchvision's rgb_to_grayscale.
fn luma(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// Mean gray level in [0, 1] over a strided sample of at most ~65k pixels: the contrast
/// jitter's pivot (torchvision uses the whole image's mean).
pub fn mean_gray(p: &Pixels) -> f32 {
    let n = p.width as usize * p.height as usize;
    let stride = (n / 65_536).max(1);
    let c = p.channels as usize;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for i in (0..n).step_by(stride) {
        let px = &p.data[i * c..i * c + c];
        sum += if c == 3 { luma(px[0] as f32, px[1] as f32, px[2] as f32) as f64 } else { px[0] as f64 };
        count += 1;
    }
    (sum / count as f64 / 255.0) as f32
}

/// Renders every view of `pixels` into `outputs` (one planar [C, H, W] slice per view).
/// `b` is in the coordinates of `pixels`. Jitter runs on the resized view (equivalent to
/// jittering first, up to clamping) with the contrast pivot `gray_mean` of the whole image.
pub fn render_views(
    pixels: &Pixels,
    b: &CropBox,
    augment: &Augment,
    gray_mean: f32,
    views: &[ViewSpec],
    outputs: &mut [&mut [f32]],
    resizer: &mut Resizer,
) -> std::result::Result<(), String> {
    let pixel_type = if pixels.channels == 3 { PixelType::U8x3 } else { PixelType::U8 };
    let src = ImageRef::new(pixels.width, pixels.height, &pixels.data, pixel_type).map_err(|e| e.to_string())?;
    for (view, out) in views.iter().zip(outputs.iter_mut()) {
        let [h, w] = view.size;
        let mut dst = Image::new(w, h, pixel_type);
        let options =
            ResizeOptions::new().resize_alg(view.interpolation.algorithm()).crop(b.left, b.top, b.width, b.height);
        resizer.resize(&src, &mut dst, &options).map_err(|e| format!("resize failed: {e}"))?;
        write_view(dst.buffer(), pixels.channels as usize, w as usize, h as usize, augment, gray_mean, view, out);
    }
    Ok(())
}

/// u8 interleaved -> jitter -> flip -> channel conversion -> normalise, into planar floats.
#[allow(clippy::too_many_arguments)]
fn write_view(
    src: &[u8],
    src_c: usize,
    w: usize,
    h: usize,
    augment: &Augment,
    gray_mean: f32,
    view: &ViewSpec,
    out: &mut [f32],
) {
    let plane = w * h;
    let out_c = view.channels as usize;
    for y in 0..h {
        for x in 0..w {
            let sx = if augment.flip { w - 1 - x } else { x };
            let s = &src[(y * w + sx) * src_c..(y * w + sx + 1) * src_c];
            let mut rgb = if src_c == 3 {
                [s[0] as f32 / 255.0, s[1] as f32 / 255.0, s[2] as f32 / 255.0]
            } else {
                [s[0] as f32 / 255.0; 3]
            };
            let mut pivot = gray_mean;
            for j in &augment.jitter {
                match *j {
                    Jitter::Brightness { factor } => {
                        rgb = rgb.map(|v| (v * factor).clamp(0.0, 1.0));
                        pivot = (pivot * factor).min(1.0);
                    }
                    Jitter::Contrast { factor } => rgb = rgb.map(|v| ((v - pivot) * factor + pivot).clamp(0.0, 1.0)),
                    Jitter::Saturation { factor } => {
                        let g = luma(rgb[0], rgb[1], rgb[2]);
                        rgb = rgb.map(|v| ((v - g) * factor + g).clamp(0.0, 1.0));
                    }
                }
            }
            let i = y * w + x;
            if out_c == 3 {
                for c in 0..3 {
                    out[c * plane + i] = (rgb[c] - view.mean[c]) / view.std[c];
                }
            } else {
                let g = if src_c == 3 { luma(rgb[0], rgb[1], rgb[2]) } else { rgb[0] };
                out[i] = (g - view.mean[0]) / view.std[0];
            }
        }
    }
}
