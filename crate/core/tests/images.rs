//! Decoding of every supported format (pixel values checked), EXIF orientation, the decode
//! budget, crop geometry, the views' resize/flip/jitter/normalisation, and bad input.

use std::io::Cursor;
use std::path::PathBuf;

use beit_core::images::{
    crop_box, decode, load_views, Augment, Crop, CropBox, Interpolation, Jitter, Sources, ViewSpec,
};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};

const W: u32 = 37;
const H: u32 = 23;

fn rgb_at(x: u32, y: u32) -> [u8; 3] {
    [(x * 7 % 256) as u8, (y * 11 % 256) as u8, ((x + y) * 5 % 256) as u8]
}

fn rgb_image() -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    ImageBuffer::from_fn(W, H, |x, y| Rgb(rgb_at(x, y)))
}

fn gray_at(x: u32, y: u32) -> u8 {
    ((x * 5 + y * 3) % 256) as u8
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

fn full_size(w: u32, h: u32) -> (u32, u32) {
    (w, h)
}

fn decode_full(bytes: &[u8]) -> beit_core::images::Pixels {
    decode(bytes, 1 << 30, &full_size).unwrap().pixels
}

fn assert_rgb_exact(p: &beit_core::images::Pixels) {
    assert_eq!((p.width, p.height, p.channels), (W, H, 3));
    for y in 0..H {
        for x in 0..W {
            let i = ((y * W + x) * 3) as usize;
            assert_eq!(&p.data[i..i + 3], &rgb_at(x, y), "pixel ({x}, {y})");
        }
    }
}

fn assert_gray_exact(p: &beit_core::images::Pixels) {
    assert_eq!((p.width, p.height, p.channels), (W, H, 1));
    for y in 0..H {
        for x in 0..W {
            assert_eq!(p.data[(y * W + x) as usize], gray_at(x, y), "pixel ({x}, {y})");
        }
    }
}

#[test]
fn png_variants_decode_exactly() {
    let rgb = DynamicImage::ImageRgb8(rgb_image());
    assert_rgb_exact(&decode_full(&encode(rgb.clone(), ImageFormat::Png)));
    // RGBA: alpha is dropped.
    let rgba = ImageBuffer::from_fn(W, H, |x, y| {
        let [r, g, b] = rgb_at(x, y);
        Rgba([r, g, b, (x * 3) as u8])
    });
    assert_rgb_exact(&decode_full(&encode(DynamicImage::ImageRgba8(rgba), ImageFormat::Png)));
    // 16-bit RGB: v * 257 rounds back to v.
    let rgb16 = ImageBuffer::from_fn(W, H, |x, y| Rgb(rgb_at(x, y).map(|v| v as u16 * 257)));
    assert_rgb_exact(&decode_full(&encode(DynamicImage::ImageRgb16(rgb16), ImageFormat::Png)));

    let gray = ImageBuffer::from_fn(W, H, |x, y| Luma([gray_at(x, y)]));
    assert_gray_exact(&decode_full(&encode(DynamicImage::ImageLuma8(gray), ImageFormat::Png)));
    let gray16 = ImageBuffer::from_fn(W, H, |x, y| Luma([gray_at(x, y) as u16 * 257]));
    assert_gray_exact(&decode_full(&encode(DynamicImage::ImageLuma16(gray16), ImageFormat::Png)));
    let gray_alpha = ImageBuffer::from_fn(W, H, |x, y| LumaA([gray_at(x, y), 128]));
    assert_gray_exact(&decode_full(&encode(DynamicImage::ImageLumaA8(gray_alpha), ImageFormat::Png)));
}

#[test]
fn palette_png_decodes_to_its_colours() {
    let palette: Vec<[u8; 3]> = (0..16).map(|i| [i * 16, 255 - i * 16, (i * 37) % 256].map(|v| v as u8)).collect();
    let index_at = |x: u32, y: u32| ((x + 2 * y) % 16) as u8;
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, W, H);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(palette.concat());
        let mut writer = encoder.write_header().unwrap();
        let data: Vec<u8> = (0..H).flat_map(|y| (0..W).map(move |x| index_at(x, y))).collect();
        writer.write_image_data(&data).unwrap();
    }
    let p = decode_full(&bytes);
    assert_eq!((p.width, p.height, p.channels), (W, H, 3));
    for y in 0..H {
        for x in 0..W {
            let i = ((y * W + x) * 3) as usize;
            assert_eq!(p.data[i..i + 3], palette[index_at(x, y) as usize], "pixel ({x}, {y})");
        }
    }
}

#[test]
fn bmp_and_lossless_webp_decode_exactly() {
    let rgb = DynamicImage::ImageRgb8(rgb_image());
    assert_rgb_exact(&decode_full(&encode(rgb.clone(), ImageFormat::Bmp)));
    assert_rgb_exact(&decode_full(&encode(rgb, ImageFormat::WebP)));
}

#[test]
fn gif_decodes_its_first_frame() {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame};
    // Few colours, so the GIF palette holds them exactly.
    let colour = |x: u32, y: u32, frame: u32| Rgba([((x / 4) * 40 + frame * 7) as u8, ((y / 4) * 40) as u8, 90, 255]);
    let frames = (0..2).map(|f| {
        Frame::from_parts(ImageBuffer::from_fn(W, H, |x, y| colour(x, y, f)), 0, 0, Delay::from_numer_denom_ms(100, 1))
    });
    let mut bytes = Vec::new();
    GifEncoder::new(&mut bytes).encode_frames(frames).unwrap();
    let p = decode_full(&bytes);
    assert_eq!((p.width, p.height, p.channels), (W, H, 3));
    for y in 0..H {
        for x in 0..W {
            let i = ((y * W + x) * 3) as usize;
            assert_eq!(p.data[i..i + 3], colour(x, y, 0).0[..3], "pixel ({x}, {y})");
        }
    }
}

fn jpeg(data: &[u8], w: u32, h: u32, color: jpeg_encoder::ColorType, exif_orientation: Option<u16>) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 100);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
    if let Some(orientation) = exif_orientation {
        encoder.add_app_segment(1, exif_with_orientation(orientation)).unwrap();
    }
    encoder.encode(data, w as u16, h as u16, color).unwrap();
    bytes
}

/// A minimal big-endian Exif block: IFD0 with one Orientation (0x0112) SHORT entry.
fn exif_with_orientation(orientation: u16) -> Vec<u8> {
    let mut v = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec();
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&0x0112u16.to_be_bytes());
    v.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&orientation.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding + next IFD offset
    v
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

/// A smooth image JPEG keeps within a few levels at quality 100.
fn smooth_rgb(w: u32, h: u32) -> Vec<u8> {
    (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 255 / w) as u8, (y * 255 / h) as u8, 128])).collect()
}

#[test]
fn jpeg_rgb_gray_and_cmyk_decode_close_to_the_source() {
    let (w, h) = (48, 32);
    let rgb = smooth_rgb(w, h);
    let p = decode_full(&jpeg(&rgb, w, h, jpeg_encoder::ColorType::Rgb, None));
    assert_eq!((p.width, p.height, p.channels), (w, h, 3));
    assert!(max_abs_diff(&p.data, &rgb) <= 4, "rgb diff {}", max_abs_diff(&p.data, &rgb));

    let gray: Vec<u8> = (0..h).flat_map(|_| (0..w).map(move |x| (x * 5) as u8)).collect();
    let p = decode_full(&jpeg(&gray, w, h, jpeg_encoder::ColorType::Luma, None));
    assert_eq!(p.channels, 1);
    assert!(max_abs_diff(&p.data, &gray) <= 3);

    // Flat CMYK inks: cyan -> (0, 255, 255); 50% black on magenta -> (128, 0, 128).
    for (ink, want) in [([255u8, 0, 0, 0], [0u8, 255, 255]), ([0, 255, 0, 127], [128, 0, 128])] {
        let cmyk: Vec<u8> = std::iter::repeat_n(ink, (w * h) as usize).flatten().collect();
        let p = decode_full(&jpeg(&cmyk, w, h, jpeg_encoder::ColorType::Cmyk, None));
        assert_eq!(p.channels, 3);
        let centre = (((h / 2) * w + w / 2) * 3) as usize;
        assert!(
            max_abs_diff(&p.data[centre..centre + 3], &want) <= 3,
            "ink {ink:?}: got {:?}, want {want:?}",
            &p.data[centre..centre + 3]
        );
    }
}

#[test]
fn exif_orientation_is_applied() {
    // Stored 48x32: red on the left half, blue bottom rows.
    let (w, h) = (48u32, 32u32);
    let stored: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [if x < w / 2 { 250 } else { 5 }, 5, if y >= h / 2 { 250 } else { 5 }]))
        .collect();
    let red_blue = |p: &beit_core::images::Pixels, x: u32, y: u32| {
        let i = ((y * p.width + x) * 3) as usize;
        (p.data[i] > 128, p.data[i + 2] > 128)
    };
    // 1: as stored. Top-left is red, not blue.
    let p = decode_full(&jpeg(&stored, w, h, jpeg_encoder::ColorType::Rgb, Some(1)));
    assert_eq!((p.width, p.height), (w, h));
    assert_eq!(red_blue(&p, 2, 2), (true, false));
    // 3: rotated 180. Top-left is the stored bottom-right: blue, not red.
    let p = decode_full(&jpeg(&stored, w, h, jpeg_encoder::ColorType::Rgb, Some(3)));
    assert_eq!((p.width, p.height), (w, h));
    assert_eq!(red_blue(&p, 2, 2), (false, true));
    // 6: rotate 90 clockwise to display. Upright is 32x48; top-left is the stored bottom-left.
    let p = decode_full(&jpeg(&stored, w, h, jpeg_encoder::ColorType::Rgb, Some(6)));
    assert_eq!((p.width, p.height), (h, w));
    assert_eq!(red_blue(&p, 2, 2), (true, true));
    assert_eq!(red_blue(&p, h - 3, h - 3 + 10), (false, false));
    // 2: mirrored. Top-left is the stored top-right.
    let p = decode_full(&jpeg(&stored, w, h, jpeg_encoder::ColorType::Rgb, Some(2)));
    assert_eq!(red_blue(&p, 2, 2), (false, false));
}

#[test]
fn large_jpeg_is_downscaled_while_decoding_and_other_formats_obey_the_budget() {
    let (w, h) = (800, 600);
    let bytes = jpeg(&smooth_rgb(w, h), w, h, jpeg_encoder::ColorType::Rgb, None);
    // Asking for 150x113 of the full 800x600 decodes at 1/4.
    let d = decode(&bytes, 1 << 30, &|_, _| (150, 113)).unwrap();
    assert_eq!((d.full_width, d.full_height), (w, h));
    assert_eq!((d.pixels.width, d.pixels.height), (200, 150));
    // A budget of 40k pixels allows at most 1/4 (200x150 = 30k) even when the full size is asked for.
    let d = decode(&bytes, 40_000, &full_size).unwrap();
    assert_eq!((d.pixels.width, d.pixels.height), (200, 150));
    // Under 1/8 of the budget: refused with the reason.
    let err = decode(&bytes, 1000, &full_size).err().unwrap();
    assert!(err.contains("decode budget"), "{err}");
    let png = encode(DynamicImage::ImageRgb8(rgb_image()), ImageFormat::Png);
    let err = decode(&png, 100, &full_size).err().unwrap();
    assert!(err.contains("exceeds the decode budget") && err.contains("37x23"), "{err}");
}

/// A lossless (SOF3) gray JPEG of `pixels` (w x h, values below 2^precision): predictor 1 (the
/// left neighbour; the one above in the first column, 2^(precision-1) for the first pixel) and
/// one Huffman table giving each difference category 0..=16 a 5-bit code. jpeg-encoder writes
/// only DCT JPEGs.
fn lossless_jpeg(pixels: &[u16], w: u16, h: u16, precision: u8) -> Vec<u8> {
    let segment = |marker: u8, body: &[u8]| {
        let len = (body.len() + 2) as u16;
        [&[0xFF, marker], &len.to_be_bytes()[..], body].concat()
    };
    let mut bits = String::new();
    for y in 0..h as usize {
        for x in 0..w as usize {
            let at = |x: usize, y: usize| pixels[y * w as usize + x] as i32;
            let predicted = match (x, y) {
                (0, 0) => 1 << (precision - 1),
                (0, _) => at(0, y - 1),
                _ => at(x - 1, y),
            };
            // Differences are taken modulo 2^16; category 16 (32768) has no extra bits.
            let d = (at(x, y) - predicted + 32768).rem_euclid(65536) - 32768;
            let category = 32 - d.unsigned_abs().leading_zeros();
            bits += &format!("{category:05b}");
            if (1..16).contains(&category) {
                let extra = if d > 0 { d } else { d + (1 << category) - 1 };
                bits += &format!("{:0width$b}", extra, width = category as usize);
            }
        }
    }
    while !bits.len().is_multiple_of(8) {
        bits.push('1');
    }
    let mut scan = vec![];
    for chunk in bits.as_bytes().chunks(8) {
        let byte = u8::from_str_radix(std::str::from_utf8(chunk).unwrap(), 2).unwrap();
        scan.push(byte);
        if byte == 0xFF {
            scan.push(0); // stuffing
        }
    }
    let mut table = vec![0x00]; // DC table 0
    table.extend([0, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // 17 codes of 5 bits
    table.extend(0..=16u8);
    let [h1, h0] = h.to_be_bytes();
    let [w1, w0] = w.to_be_bytes();
    [
        &[0xFF, 0xD8][..],
        &segment(0xC3, &[precision, h1, h0, w1, w0, 1, 1, 0x11, 0]),
        &segment(0xC4, &table),
        &segment(0xDA, &[1, 1, 0x00, 1, 0, 0]), // predictor 1, no point transform
        &scan,
        &[0xFF, 0xD9],
    ]
    .concat()
}

/// Lossless JPEGs cannot be reduced while decoding, so they decode whole, and their 9-16-bit
/// samples scale to 8 bits by their own precision.
#[test]
fn lossless_jpegs_decode_whole_at_their_precision() {
    // Left half 0, right half the top value, at 8, 12 and 16 bits.
    let (w, h) = (64u16, 48u16);
    for precision in [8u8, 12, 16] {
        let top = ((1u32 << precision) - 1) as u16;
        let pixels: Vec<u16> = (0..h).flat_map(|_| (0..w).map(move |x| if x < w / 2 { 0 } else { top })).collect();
        let bytes = lossless_jpeg(&pixels, w, h, precision);
        // A request for a quarter of the size still decodes all of it.
        let d = decode(&bytes, 1 << 30, &|_, _| (16, 12)).unwrap();
        assert_eq!((d.pixels.width, d.pixels.height, d.pixels.channels), (64, 48, 1), "{precision} bits");
        let expected: Vec<u8> = (0..h).flat_map(|_| (0..w).map(move |x| if x < w / 2 { 0 } else { 255 })).collect();
        assert_eq!(d.pixels.data, expected, "{precision} bits");
    }
    // Mid-grey at 12 and 16 bits: 2048 / 4095 and 32768 / 65535 of 255, rounded.
    for (precision, value) in [(12u8, 2048u16), (16, 32768)] {
        let d = decode(&lossless_jpeg(&[value; 64], 8, 8, precision), 1 << 30, &full_size).unwrap();
        assert!(d.pixels.data.iter().all(|&v| v == 128), "{precision} bits: {:?}", &d.pixels.data[..4]);
    }
    let err = decode(&lossless_jpeg(&vec![0; 64 * 48], 64, 48, 8), 1000, &full_size).err().unwrap();
    assert!(err.contains("lossless JPEG 64x48 exceeds the decode budget"), "{err}");
}

#[test]
fn bad_bytes_are_errors_not_panics() {
    let png = encode(DynamicImage::ImageRgb8(rgb_image()), ImageFormat::Png);
    let jpg = jpeg(&smooth_rgb(64, 64), 64, 64, jpeg_encoder::ColorType::Rgb, None);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "empty file"),
        ("text", b"hello, I am not an image\n".to_vec(), "not a recognised image"),
        ("truncated png", png[..png.len() / 2].to_vec(), "PNG"),
        ("truncated jpeg", jpg[..jpg.len() / 3].to_vec(), "JPEG"),
        ("jpeg header only", jpg[..20].to_vec(), "JPEG"),
        ("png signature then garbage", [&png[..8], &[7u8; 64][..]].concat(), "PNG"),
    ];
    for (name, bytes, expect) in cases {
        match decode(&bytes, 1 << 30, &full_size) {
            Ok(d) => panic!("{name}: decoded a {}x{} image from bad bytes", d.pixels.width, d.pixels.height),
            Err(e) => assert!(e.contains(expect), "{name}: error {e:?} should mention {expect:?}"),
        }
    }
}

fn random_resized(attempts: Vec<[f64; 2]>, position: [f64; 2]) -> Crop {
    Crop::RandomResized { attempts, position, ratio_range: [0.75, 4.0 / 3.0] }
}

#[test]
fn crop_boxes_follow_random_resized_crop_and_center_crop() {
    // The first attempt does not fit (too wide), the second does.
    let crop = random_resized(vec![[1.0, 2.0], [0.25, 1.0]], [0.0, 0.0]);
    assert_eq!(crop_box(&crop, 100, 100, 1.0), CropBox { left: 0.0, top: 0.0, width: 50.0, height: 50.0 });
    let crop = random_resized(vec![[0.25, 1.0]], [0.999, 0.5]);
    assert_eq!(crop_box(&crop, 100, 100, 1.0), CropBox { left: 50.0, top: 25.0, width: 50.0, height: 50.0 });
    // No attempt fits: a 300x100 image is cropped to the centred 4:3 box.
    let crop = random_resized(vec![[1.0, 5.0]], [0.3, 0.3]);
    assert_eq!(crop_box(&crop, 300, 100, 1.0), CropBox { left: 83.0, top: 0.0, width: 133.0, height: 100.0 });
    // Centre crop of a 256x200 image for a square view at 0.875: 175x175 centred.
    let centre = Crop::Center { fraction: 0.875 };
    assert_eq!(crop_box(&centre, 256, 200, 1.0), CropBox { left: 40.0, top: 12.0, width: 175.0, height: 175.0 });
}

fn view(size: [u32; 2], interpolation: Interpolation, channels: u8) -> ViewSpec {
    let c = channels as usize;
    ViewSpec { size, interpolation, channels, mean: vec![0.0; c], std: vec![1.0; c] }
}

fn plain(crop: Crop) -> Augment {
    Augment { crop, flip: false, jitter: vec![] }
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap()
}

/// A 1-channel 40x30 image whose value is its x coordinate, and one whose value is 200.
fn pixel_source() -> Vec<u8> {
    let ramp = (0..30).flat_map(|_| 0..40u8);
    let flat = std::iter::repeat_n(200u8, 1200);
    ramp.chain(flat).collect()
}

#[test]
fn nearest_crop_flip_and_normalisation_are_exact() {
    let data = pixel_source();
    let indices = [0u32];
    let sources = Sources::Pixels { data: &data, height: 30, width: 40, channels: 1, indices: &indices };
    // An 8x4 box at (10, 5), resized 1:1 with nearest: columns 10..18.
    let crop = random_resized(vec![[32.0 / 1200.0, 2.0]], [10.0 / 33.0 + 1e-9, 5.0 / 27.0 + 1e-9]);
    let spec = view([4, 8], Interpolation::Nearest, 1);
    let run = |augment: Augment, spec: ViewSpec| {
        load_views(&pool(), &sources, &[augment], &[spec], 1 << 30).unwrap().views.remove(0)
    };
    let out = run(plain(crop.clone()), spec.clone());
    assert_eq!(&out[..8], &(10..18).map(|v| v as f32 / 255.0).collect::<Vec<_>>()[..]);
    let flipped = run(Augment { flip: true, ..plain(crop.clone()) }, spec.clone());
    assert_eq!(&flipped[..8], &(10..18).rev().map(|v| v as f32 / 255.0).collect::<Vec<_>>()[..]);
    // Three channels from gray, normalised per channel.
    let spec3 =
        ViewSpec { mean: vec![0.5, 0.0, 0.1], std: vec![0.5, 2.0, 1.0], ..view([4, 8], Interpolation::Nearest, 3) };
    let out3 = run(plain(crop), spec3);
    assert_eq!(out3.len(), 3 * 32);
    let x = 10.0 / 255.0;
    assert!((out3[0] - (x - 0.5) / 0.5).abs() < 1e-6);
    assert!((out3[32] - x / 2.0).abs() < 1e-6);
    assert!((out3[64] - (x - 0.1)).abs() < 1e-6);
}

#[test]
fn resampling_filters_keep_flat_images_flat_and_differ_on_detail() {
    let data = pixel_source();
    let indices = [0u32, 1];
    let sources = Sources::Pixels { data: &data, height: 30, width: 40, channels: 1, indices: &indices };
    let centre = plain(Crop::Center { fraction: 1.0 });
    let views = [view([7, 7], Interpolation::Bicubic, 1), view([5, 5], Interpolation::Lanczos, 1)];
    let batch = load_views(&pool(), &sources, &[centre.clone(), centre], &views, 1 << 30).unwrap();
    assert_eq!(batch.kept, vec![0, 1]);
    assert_eq!(batch.views[0].len(), 2 * 49);
    assert_eq!(batch.views[1].len(), 2 * 25);
    // Image 1 is flat 200: every filter reproduces it.
    for v in batch.views[0][49..].iter().chain(&batch.views[1][25..]) {
        assert!((v - 200.0 / 255.0).abs() < 1.5 / 255.0, "{v}");
    }
    // Image 0 is a ramp over the centred 30x30 box (x 5..35): left to right increasing.
    let row: Vec<f32> = batch.views[0][..7].to_vec();
    assert!(row.windows(2).all(|p| p[1] > p[0]), "{row:?}");
    assert!(row[0] > 5.0 / 255.0 && row[6] < 35.0 / 255.0, "{row:?}");
}

#[test]
fn color_jitter_matches_its_definitions() {
    let data: Vec<u8> = [200u8, 100, 50].repeat(16);
    let indices = [0u32];
    let sources = Sources::Pixels { data: &data, height: 4, width: 4, channels: 3, indices: &indices };
    let spec = view([2, 2], Interpolation::Bilinear, 3);
    let pixel = |jitter: Vec<Jitter>| {
        let augment = Augment { crop: Crop::Center { fraction: 1.0 }, flip: false, jitter };
        let out =
            load_views(&pool(), &sources, &[augment], std::slice::from_ref(&spec), 1 << 30).unwrap().views.remove(0);
        [out[0], out[4], out[8]]
    };
    let rgb = [200.0f32 / 255.0, 100.0 / 255.0, 50.0 / 255.0];
    let gray = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
    let close = |a: [f32; 3], b: [f32; 3]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 2e-3);
    assert!(close(pixel(vec![]), rgb));
    assert!(close(pixel(vec![Jitter::Brightness { factor: 1.5 }]), rgb.map(|v| (v * 1.5).min(1.0))));
    // Saturation 0 is grayscale; contrast 0 on a flat image is its mean gray.
    assert!(close(pixel(vec![Jitter::Saturation { factor: 0.0 }]), [gray; 3]));
    assert!(close(pixel(vec![Jitter::Contrast { factor: 0.0 }]), [gray; 3]));
    // Brightness first moves the contrast pivot with it.
    assert!(close(pixel(vec![Jitter::Brightness { factor: 0.5 }, Jitter::Contrast { factor: 0.0 }]), [gray * 0.5; 3]));
    // RGB to one channel is luma.
    let out = load_views(
        &pool(),
        &sources,
        &[plain(Crop::Center { fraction: 1.0 })],
        &[view([2, 2], Interpolation::Bilinear, 1)],
        1 << 30,
    )
    .unwrap();
    assert!((out.views[0][0] - gray).abs() < 2e-3);
}

#[test]
fn unreadable_and_corrupt_files_are_reported_and_left_out() {
    let dir = std::env::temp_dir().join(format!("beit-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.png");
    std::fs::write(&good, encode(DynamicImage::ImageRgb8(rgb_image()), ImageFormat::Png)).unwrap();
    let empty = dir.join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let text = dir.join("notes.png");
    std::fs::write(&text, b"not a picture").unwrap();
    let missing = dir.join("missing.jpg");
    let paths: Vec<PathBuf> = vec![empty, good.clone(), missing, text, good];
    let augments = vec![plain(Crop::Center { fraction: 1.0 }); paths.len()];
    let batch =
        load_views(&pool(), &Sources::Files(&paths), &augments, &[view([8, 8], Interpolation::Bicubic, 3)], 1 << 30)
            .unwrap();
    assert_eq!(batch.kept, vec![1, 4]);
    assert_eq!(batch.views[0].len(), 2 * 3 * 64);
    let reasons: Vec<(u32, &str)> = batch.failures.iter().map(|f| (f.index, f.reason.as_str())).collect();
    assert_eq!(reasons.len(), 3);
    assert!(reasons[0].0 == 0 && reasons[0].1.contains("empty"), "{reasons:?}");
    assert!(reasons[1].0 == 2 && reasons[1].1.contains("cannot read file"), "{reasons:?}");
    assert!(reasons[2].0 == 3 && reasons[2].1.contains("not a recognised image"), "{reasons:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_requests_are_errors_before_any_work() {
    let data = pixel_source();
    let ok_view = view([4, 4], Interpolation::Bicubic, 1);
    let run = |indices: &[u32], augments: &[Augment], views: &[ViewSpec]| {
        let sources = Sources::Pixels { data: &data, height: 30, width: 40, channels: 1, indices };
        load_views(&pool(), &sources, augments, views, 1 << 30).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let centre = plain(Crop::Center { fraction: 1.0 });
    assert!(
        run(&[5], std::slice::from_ref(&centre), std::slice::from_ref(&ok_view)).contains("index 5 is out of range")
    );
    assert!(run(&[0, 1], std::slice::from_ref(&centre), std::slice::from_ref(&ok_view))
        .contains("1 augment entries for 2 images"));
    assert!(run(&[0], std::slice::from_ref(&centre), &[ViewSpec { channels: 2, ..ok_view.clone() }])
        .contains("channels must be 1 or 3"));
    assert!(run(&[0], std::slice::from_ref(&centre), &[ViewSpec { std: vec![0.0], ..ok_view.clone() }])
        .contains("std values must be positive"));
    assert!(run(&[0], &[plain(Crop::Center { fraction: 1.5 })], std::slice::from_ref(&ok_view)).contains("fraction"));
    let bad_jitter = Augment { jitter: vec![Jitter::Brightness { factor: -1.0 }], ..centre };
    assert!(run(&[0], &[bad_jitter], &[ok_view]).contains("jitter factor"));
}
