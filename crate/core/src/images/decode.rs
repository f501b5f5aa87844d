//! Decoding encoded images (JPEG, PNG, WebP, BMP, GIF) to 8-bit gray or RGB pixels, upright
//! (EXIF orientation applied), within a bounded pixel budget.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageReader, Limits, Luma, Rgb};

/// 8-bit pixels, row-major, `channels` interleaved values per pixel (1 = gray, 3 = RGB).
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
}

impl Pixels {
    pub fn new(width: u32, height: u32, channels: u8, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width as usize * height as usize * channels as usize);
        Self { width, height, channels, data }
    }
}

/// A decoded image and the upright size of the full-resolution original (larger than the pixels
/// when a JPEG was downscaled while decoding).
pub struct Decoded {
    pub pixels: Pixels,
    pub full_width: u32,
    pub full_height: u32,
}

/// Full-resolution upright size -> smallest decoded size that still serves the request.
pub type SizeRequest<'a> = &'a dyn Fn(u32, u32) -> (u32, u32);

/// Decodes `bytes`. `max_pixels` bounds the decoded pixel count: JPEGs are downscaled in the
/// DCT (1/2, 1/4 or 1/8) to fit it and to the smallest scale that still covers
/// `request(full_width, full_height)`; other formats larger than the budget are refused.
pub fn decode(bytes: &[u8], max_pixels: u64, request: SizeRequest) -> Result<Decoded, String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes, max_pixels, request);
    }
    decode_other(bytes, max_pixels)
}

fn decode_other(bytes: &[u8], max_pixels: u64) -> Result<Decoded, String> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
    let format =
        reader.format().ok_or_else(|| "not a recognised image (expected JPEG, PNG, WebP, BMP or GIF)".to_string())?;
    let mut reader = reader;
    let mut limits = Limits::default();
    // 16-bit RGBA is the widest layout decoded here: 8 bytes per pixel, plus the 8-bit copy.
    limits.max_alloc = Some(max_pixels.saturating_mul(12));
    reader.limits(limits);
    let name = format_name(format);
    let mut decoder = reader.into_decoder().map_err(|e| format!("invalid {name}: {e}"))?;
    let (w, h) = decoder.dimensions();
    let pixel_count = w as u64 * h as u64;
    if pixel_count > max_pixels {
        return Err(format!(
            "{name} image {w}x{h} ({}) exceeds the decode budget of {}; only JPEG can be downscaled while decoding",
            describe_pixels(pixel_count),
            describe_pixels(max_pixels)
        ));
    }
    // WebP (as libvips and Pillow write it) prefixes its EXIF chunk with JPEG's APP1 "Exif\0\0",
    // which `Orientation::from_exif_chunk` does not skip: it would leave the image unrotated.
    let orientation = decoder
        .exif_metadata()
        .ok()
        .flatten()
        .and_then(|exif| Orientation::from_exif_chunk(exif.strip_prefix(b"Exif\0\0").unwrap_or(&exif)))
        .unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| format!("corrupt or truncated {name}: {e}"))?;
    image.apply_orientation(orientation);
    let pixels = to_pixels(image);
    Ok(Decoded { full_width: pixels.width, full_height: pixels.height, pixels })
}

/// Gray and gray+alpha sources stay one channel; everything else becomes RGB. Alpha is
/// dropped (as PIL's `convert("RGB")`); 16-bit samples are rounded to 8 bits.
fn to_pixels(image: DynamicImage) -> Pixels {
    let (width, height) = (image.width(), image.height());
    if image.color().has_color() {
        Pixels::new(width, height, 3, image.into_rgb8().into_raw())
    } else {
        Pixels::new(width, height, 1, image.into_luma8().into_raw())
    }
}

fn decode_jpeg(bytes: &[u8], max_pixels: u64, request: SizeRequest) -> Result<Decoded, String> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.read_info().map_err(|e| format!("invalid JPEG: {e}"))?;
    let info = decoder.info().expect("read_info succeeded");
    let orientation = decoder.exif_data().and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
    let (stored_w, stored_h) = (info.width as u32, info.height as u32);
    let swaps = matches!(
        orientation,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    );
    let (full_w, full_h) = if swaps { (stored_h, stored_w) } else { (stored_w, stored_h) };

    let (want_w, want_h) = request(full_w, full_h);
    let size_at = |d: u32| (stored_w.div_ceil(d), stored_h.div_ceil(d));
    let fits = |d: u32| {
        let (w, h) = size_at(d);
        w as u64 * h as u64 <= max_pixels
    };
    // Lossless JPEGs have no DCT to reduce (jpeg-decoder ignores the request for them and
    // returns every pixel), so they decode whole.
    let lossless = info.coding_process == jpeg_decoder::CodingProcess::Lossless;
    let (out_w, out_h) = if lossless {
        if !fits(1) {
            return Err(format!(
                "lossless JPEG {stored_w}x{stored_h} exceeds the decode budget of {} (only DCT JPEGs can be downscaled while decoding)",
                describe_pixels(max_pixels)
            ));
        }
        (stored_w, stored_h)
    } else {
        // The largest DCT reduction that still covers the request, within the budget; else the
        // largest image the budget allows.
        let covers = |d: u32| full_w.div_ceil(d) >= want_w && full_h.div_ceil(d) >= want_h;
        let reduction = [8, 4, 2, 1]
            .into_iter()
            .find(|&d| covers(d) && fits(d))
            .or_else(|| [1, 2, 4, 8].into_iter().find(|&d| fits(d)))
            .ok_or_else(|| {
                format!(
                    "JPEG {stored_w}x{stored_h} exceeds the decode budget of {} even at 1/8 scale",
                    describe_pixels(max_pixels)
                )
            })?;
        let (req_w, req_h) = size_at(reduction);
        let (w, h) = decoder.scale(req_w as u16, req_h as u16).map_err(|e| format!("invalid JPEG: {e}"))?;
        (w as u32, h as u32)
    };
    decoder.set_max_decoding_buffer_size(usize::try_from(max_pixels.saturating_mul(4)).unwrap_or(usize::MAX));
    let raw = decoder.decode().map_err(|e| format!("corrupt or truncated JPEG: {e}"))?;
    let (w, h) = (out_w, out_h);
    let mut image = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => DynamicImage::ImageLuma8(buffer::<Luma<u8>>(w, h, raw)?),
        jpeg_decoder::PixelFormat::L16 => {
            // Samples of 9-16 bits (lossless only), native-endian, 0..2^precision - 1.
            let precision = sample_precision(bytes).ok_or("invalid JPEG: no frame header")?;
            let top = ((1u32 << precision) - 1) as f64;
            let gray = raw
                .chunks_exact(2)
                .map(|v| (u16::from_ne_bytes([v[0], v[1]]).min(top as u16) as f64 * 255.0 / top).round() as u8)
                .collect();
            DynamicImage::ImageLuma8(buffer::<Luma<u8>>(w, h, gray)?)
        }
        jpeg_decoder::PixelFormat::RGB24 => DynamicImage::ImageRgb8(buffer::<Rgb<u8>>(w, h, raw)?),
        jpeg_decoder::PixelFormat::CMYK32 => DynamicImage::ImageRgb8(buffer::<Rgb<u8>>(w, h, cmyk_to_rgb(&raw))?),
    };
    image.apply_orientation(orientation);
    Ok(Decoded { pixels: to_pixels(image), full_width: full_w, full_height: full_h })
}

fn buffer<P: image::Pixel<Subpixel = u8>>(w: u32, h: u32, raw: Vec<u8>) -> Result<ImageBuffer<P, Vec<u8>>, String> {
    // Exactly: `from_raw` would take a longer buffer and read its rows at the wrong width.
    let expected = w as usize * h as usize * P::CHANNEL_COUNT as usize;
    if raw.len() != expected {
        return Err(format!("JPEG decoder returned {} bytes for {w}x{h}, expected {expected}", raw.len()));
    }
    Ok(ImageBuffer::from_raw(w, h, raw).expect("length checked"))
}

/// The sample precision in bits of a JPEG's frame header (SOF0-SOF15), walking the markers
/// from the start; jpeg-decoder keeps it to itself.
fn sample_precision(bytes: &[u8]) -> Option<u8> {
    let mut at = 2; // past SOI
    while at + 4 < bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        let marker = bytes[at + 1];
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        let length = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
        // SOFn, not DHT (C4), JPG (C8) or DAC (CC).
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            return bytes.get(at + 4).copied();
        }
        at += 2 + length;
    }
    None
}

/// jpeg-decoder hands out CMYK with Adobe's inversion undone (0 = no ink).
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = 255 - px[3] as u32;
        for &ink in &px[..3] {
            rgb.push((((255 - ink as u32) * k + 127) / 255) as u8);
        }
    }
    rgb
}

fn format_name(format: image::ImageFormat) -> String {
    match format {
        image::ImageFormat::Png => "PNG".into(),
        image::ImageFormat::WebP => "WebP".into(),
        image::ImageFormat::Bmp => "BMP".into(),
        image::ImageFormat::Gif => "GIF".into(),
        other => format!("{other:?}"),
    }
}

pub(super) fn describe_pixels(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{:.1} MP", n as f64 / 1e6)
    } else {
        format!("{n} pixels")
    }
}
