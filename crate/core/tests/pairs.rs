//! Image + mask pairs: mask PNGs (palette, gray, narrow bit depths) read as ids, reduceZeroLabel,
//! bad masks (colour, wrong size, ids out of range), and the joint augmentation: rescale with
//! nearest-neighbour masks, padding, crops that avoid one-class windows, flip, photometric steps.

use std::path::PathBuf;

use beit_core::images::pairs::distort;
use beit_core::images::{
    load_pairs, load_whole_pairs, Interpolation, MaskSpec, PairAugment, PairBatch, PairSources, Photometric, Rescale,
    ViewSpec,
};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma};

/// In-memory gray pairs, `indices` picking the batch (and naming its pairs in errors).
fn gray_pairs<'a>(images: &'a [u8], masks: &'a [u8], height: u32, width: u32, indices: &'a [u32]) -> PairSources<'a> {
    PairSources::Pixels { images, masks, height, width, channels: 1, indices, numbers: indices }
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap()
}

fn gray_view(h: u32, w: u32) -> ViewSpec {
    ViewSpec { size: [h, w], interpolation: Interpolation::Bilinear, channels: 1, mean: vec![0.0], std: vec![1.0] }
}

fn masks(num_labels: u32, reduce_zero_label: bool) -> MaskSpec {
    MaskSpec { num_labels, ignore_index: 255, reduce_zero_label }
}

fn plain() -> PairAugment {
    PairAugment { rescale: None, crop: vec![], cat_max_ratio: 1.0, flip: false, photometric: vec![] }
}

/// A scratch folder, removed when the test ends (passing or not).
struct TempDir(PathBuf);

impl TempDir {
    fn join(&self, name: impl AsRef<std::path::Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("beit-pairs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn write_gray_image(path: &PathBuf, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    let image = ImageBuffer::from_fn(w, h, |x, y| Luma([f(x, y)]));
    DynamicImage::ImageLuma8(image).save_with_format(path, ImageFormat::Png).unwrap();
}

/// A mask PNG of `color` and `depth` holding `ids` (packed as the depth needs).
fn write_mask(path: &PathBuf, w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, ids: &[u8]) {
    let bits = depth as usize;
    let line = (w as usize * bits).div_ceil(8);
    let mut data = vec![0u8; line * h as usize];
    for y in 0..h as usize {
        for x in 0..w as usize {
            let v = ids[y * w as usize + x];
            let bit = x * bits;
            data[y * line + bit / 8] |= v << (8 - bits - bit % 8);
        }
    }
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(file, w, h);
    encoder.set_color(color);
    encoder.set_depth(depth);
    if color == png::ColorType::Indexed {
        encoder.set_palette((0..(1usize << bits) * 3).map(|i| (i * 37 % 256) as u8).collect::<Vec<_>>());
    }
    encoder.write_header().unwrap().write_image_data(&data).unwrap();
}

fn load_files(
    images: &[PathBuf],
    mask_paths: &[PathBuf],
    augment: PairAugment,
    view: &ViewSpec,
    spec: &MaskSpec,
) -> beit_core::Result<PairBatch> {
    let augments = vec![augment; images.len()];
    load_pairs(&pool(), &PairSources::Files { images, masks: mask_paths }, &augments, view, spec, 1 << 26)
}

fn id_at(x: u32, y: u32, classes: u32) -> u8 {
    ((x / 3 + 2 * y) % classes) as u8
}

#[test]
fn palette_gray_and_narrow_masks_decode_to_their_ids() {
    let dir = temp_dir("decode");
    let (w, h) = (13, 7);
    let image = dir.join("image.png");
    write_gray_image(&image, w, h, |x, y| (x * 10 + y) as u8);
    let cases = [
        (png::ColorType::Indexed, png::BitDepth::Eight, 11),
        (png::ColorType::Indexed, png::BitDepth::Four, 11),
        (png::ColorType::Indexed, png::BitDepth::Two, 4),
        (png::ColorType::Grayscale, png::BitDepth::Eight, 11),
        (png::ColorType::Grayscale, png::BitDepth::One, 2),
    ];
    for (k, (color, depth, classes)) in cases.into_iter().enumerate() {
        let ids: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |x| id_at(x, y, classes))).collect();
        let mask = dir.join(format!("mask{k}.png"));
        write_mask(&mask, w, h, color, depth, &ids);
        let batch =
            load_files(std::slice::from_ref(&image), &[mask], plain(), &gray_view(h, w), &masks(classes, false))
                .unwrap();
        assert!(batch.failures.is_empty(), "{color:?} {depth:?}: {}", batch.failures[0].reason);
        assert_eq!(batch.masks, ids, "{color:?} {depth:?}");
        for y in 0..h {
            for x in 0..w {
                let got = batch.pixels[(y * w + x) as usize];
                assert!((got - (x * 10 + y) as f32 / 255.0).abs() < 1e-6, "pixel ({x}, {y})");
            }
        }
    }
}

#[test]
fn reduce_zero_label_ignores_zero_and_shifts_the_rest() {
    let dir = temp_dir("reduce");
    let image = dir.join("image.png");
    write_gray_image(&image, 4, 1, |_, _| 0);
    let mask = dir.join("mask.png");
    write_mask(&mask, 4, 1, png::ColorType::Grayscale, png::BitDepth::Eight, &[0, 1, 3, 255]);
    let batch = load_files(&[image], &[mask], plain(), &gray_view(1, 4), &masks(3, true)).unwrap();
    assert_eq!(batch.masks, vec![255, 0, 2, 255]);
}

#[test]
fn bad_masks_are_skipped_with_the_reason_and_unknown_ids_are_fatal() {
    let dir = temp_dir("bad");
    let image = dir.join("image.png");
    write_gray_image(&image, 6, 4, |x, _| x as u8);
    let good = dir.join("good.png");
    write_mask(&good, 6, 4, png::ColorType::Grayscale, png::BitDepth::Eight, &[1; 24]);
    let small = dir.join("small.png");
    write_mask(&small, 5, 4, png::ColorType::Grayscale, png::BitDepth::Eight, &[1; 20]);
    let colour = dir.join("colour.png");
    DynamicImage::ImageRgb8(ImageBuffer::from_pixel(6, 4, image::Rgb([1, 2, 3]))).save(&colour).unwrap();
    let bmp = dir.join("mask.bmp");
    DynamicImage::ImageLuma8(ImageBuffer::from_pixel(6, 4, Luma([1]))).save(&bmp).unwrap();
    let missing = dir.join("missing.png");

    let images = vec![image.clone(); 5];
    let mask_paths = vec![good, small, colour, bmp, missing];
    let batch = load_files(&images, &mask_paths, plain(), &gray_view(4, 6), &masks(3, false)).unwrap();
    assert_eq!(batch.kept, vec![0]);
    assert_eq!(batch.masks.len(), 24);
    let reasons: Vec<(u32, &str)> = batch.failures.iter().map(|f| (f.index, f.reason.as_str())).collect();
    assert!(reasons[0].0 == 1 && reasons[0].1.contains("the mask is 5x4 but the image 6x4"), "{reasons:?}");
    assert!(reasons[1].0 == 2 && reasons[1].1.contains("Rgb PNG cannot be a mask"), "{reasons:?}");
    assert!(reasons[2].0 == 3 && reasons[2].1.contains("masks must be PNG"), "{reasons:?}");
    assert!(reasons[3].0 == 4 && reasons[3].1.contains("cannot read mask"), "{reasons:?}");

    let unknown = dir.join("unknown.png");
    write_mask(&unknown, 6, 4, png::ColorType::Grayscale, png::BitDepth::Eight, &[7; 24]);
    let err = load_files(&[image], std::slice::from_ref(&unknown), plain(), &gray_view(4, 6), &masks(3, false))
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(message.contains(&unknown.display().to_string()) && message.contains("value 7"), "{message}");
    assert!(message.contains("numLabels 3"), "{message}");
}

/// In-memory pairs: image value = 10 * x + y, mask = id_at.
fn memory_pairs(w: u32, h: u32, count: u32, classes: u32) -> (Vec<u8>, Vec<u8>) {
    let mut images = vec![];
    let mut mask = vec![];
    for n in 0..count {
        for y in 0..h {
            for x in 0..w {
                images.push((10 * x + y + n) as u8);
                mask.push(id_at(x + n, y, classes));
            }
        }
    }
    (images, mask)
}

fn load_memory(w: u32, h: u32, indices: &[u32], augment: PairAugment, view: &ViewSpec) -> PairBatch {
    let (images, mask) = memory_pairs(w, h, 3, 5);
    let sources = gray_pairs(&images, &mask, h, w, indices);
    load_pairs(&pool(), &sources, &vec![augment; indices.len()], view, &masks(5, false), 1 << 26).unwrap()
}

#[test]
fn rescale_resizes_masks_nearest_and_pads_with_the_ignore_index() {
    // 20x15 (w x h) at scale [40, 20], ratio 0.5: factor 0.5 * min(40 / 20, 20 / 15) = 2/3 -> 13x10.
    let (w, h) = (20, 15);
    let augment = PairAugment { rescale: Some(Rescale { scale: [40.0, 20.0], ratio: 0.5, fit: false }), ..plain() };
    let batch = load_memory(w, h, &[1], augment, &gray_view(12, 16));
    let (_, mask) = memory_pairs(w, h, 3, 5);
    let source = &mask[(w * h) as usize..];
    for y in 0..12u32 {
        for x in 0..16u32 {
            let got = batch.masks[(y * 16 + x) as usize];
            let pixel = batch.pixels[(y * 16 + x) as usize];
            if y < 10 && x < 13 {
                let (sy, sx) = (y * h / 10, x * w / 13);
                assert_eq!(got, source[(sy * w + sx) as usize], "mask ({x}, {y})");
            } else {
                assert_eq!((got, pixel), (255, 0.0), "padding ({x}, {y})");
            }
        }
    }
}

#[test]
fn a_rescale_past_the_decode_budget_is_a_skip_not_an_allocation() {
    // 20x15 at scale [4e6, 3e6]: 4e12 pixels asked of a 64 Mi-pixel budget.
    let (w, h) = (20, 15);
    let augment = PairAugment { rescale: Some(Rescale { scale: [4e6, 3e6], ratio: 1.0, fit: false }), ..plain() };
    let batch = load_memory(w, h, &[0, 1], augment, &gray_view(12, 16));
    assert!(batch.kept.is_empty());
    let reasons: Vec<&str> = batch.failures.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2);
    assert!(reasons[0].starts_with("rescaled to 4000000x3000000"), "{}", reasons[0]);
    assert!(reasons[0].contains("past the budget of 67.1 MP an image (maxPixels)"), "{}", reasons[0]);
}

#[test]
fn the_rescale_target_is_truncated_to_whole_pixels_as_mmseg() {
    // [41, 21] x 0.5 is [20, 10] in mmseg (int()), so 20x15 scales by 2/3 to 13x10 (continuous
    // targets, [20.5, 10.5], would give 0.7 and 14x11).
    let (w, h) = (20, 15);
    let augment = PairAugment { rescale: Some(Rescale { scale: [41.0, 21.0], ratio: 0.5, fit: false }), ..plain() };
    let batch = load_memory(w, h, &[1], augment, &gray_view(12, 16));
    let padded = |x: u32, y: u32| batch.masks[(y * 16 + x) as usize] == 255;
    assert!(!padded(12, 9) && padded(13, 9) && padded(12, 10), "a 13x10 image in the 16x12 view");
}

/// A portrait image into a landscape view: `fit` scales it into the box (all of it kept,
/// padded right), where the long/short rule would leave it as tall as the view is wide.
#[test]
fn fit_keeps_the_whole_image_in_a_view_of_the_other_orientation() {
    // 16x32 (w x h), top half class 1 and bottom half class 2, into a 16x32 (h x w) view.
    let (w, h) = (16u32, 32u32);
    let images = vec![100u8; (w * h) as usize];
    let mask: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |_| if y < 16 { 1 } else { 2 })).collect();
    let load = |fit: bool| {
        let sources = gray_pairs(&images, &mask, h, w, &[0]);
        let augment = PairAugment { rescale: Some(Rescale { scale: [16.0, 32.0], ratio: 1.0, fit }), ..plain() };
        let batch = load_pairs(&pool(), &sources, &[augment], &gray_view(16, 32), &masks(3, false), 1 << 26);
        batch.unwrap().masks
    };
    let count = |m: &[u8], id: u8| m.iter().filter(|&&v| v == id).count();
    // Fitted: 8x16 (w x h), both halves kept (64 pixels each), the rest of the 16x32 view padding.
    let fitted = load(true);
    assert_eq!((count(&fitted, 1), count(&fitted, 2), count(&fitted, 255)), (64, 64, 16 * 32 - 128));
    assert!((0..16).all(|y| (0..8).all(|x| fitted[y * 32 + x] != 255)), "the image sits top left");
    // Without `fit`, [32, 16] is [long side, short side]: the image keeps its 32 rows, and the
    // 16-row view cuts it.
    let sources = gray_pairs(&images, &mask, h, w, &[0]);
    let augment = PairAugment { rescale: Some(Rescale { scale: [32.0, 16.0], ratio: 1.0, fit: false }), ..plain() };
    let cut = load_pairs(&pool(), &sources, &[augment], &gray_view(16, 32), &masks(3, false), 1 << 26).unwrap().masks;
    assert_eq!((count(&cut, 1), count(&cut, 2)), (128, 128), "the view cuts the middle 16 rows");
}

#[test]
fn crops_skip_windows_one_class_dominates_and_flip_mirrors_both() {
    // 16x4 (w x h): columns 0..8 class 1, 8..16 class 2; 8x4 windows (margin 8 along x).
    let (w, h) = (16u32, 4u32);
    let images: Vec<u8> = (0..h).flat_map(|_| 0..w as u8).collect();
    let mask: Vec<u8> = (0..h).flat_map(|_| (0..w).map(|x| if x < 8 { 1 } else { 2 })).collect();
    let load = |augment: PairAugment| {
        let sources = gray_pairs(&images, &mask, h, w, &[0]);
        load_pairs(&pool(), &sources, &[augment], &gray_view(4, 8), &masks(3, false), 1 << 26).unwrap()
    };
    let left_of = |b: &PairBatch| (b.pixels[0] * 255.0).round() as u32;
    // Offsets floor(u * 9): 0 (all class 1), 4 (half and half), 8 (all class 2, the last draw).
    let crop = vec![[0.0, 0.0], [0.0, 0.5], [0.0, 0.99]];
    let capped = load(PairAugment { crop: crop.clone(), cat_max_ratio: 0.75, ..plain() });
    assert_eq!(left_of(&capped), 4);
    assert_eq!(&capped.masks[..8], &[1, 1, 1, 1, 2, 2, 2, 2]);
    let uncapped = load(PairAugment { crop: crop.clone(), ..plain() });
    assert_eq!(left_of(&uncapped), 0);
    // No acceptable window: the last draw is kept, as mmseg does.
    let never = load(PairAugment { crop: vec![[0.0, 0.0], [0.0, 0.99]], cat_max_ratio: 0.75, ..plain() });
    assert_eq!(left_of(&never), 8);

    let flipped = load(PairAugment { crop: vec![[0.0, 0.5]], flip: true, ..plain() });
    assert_eq!(&flipped.masks[..8], &[2, 2, 2, 2, 1, 1, 1, 1]);
    assert_eq!(left_of(&flipped), 11);
}

#[test]
fn memory_sources_pick_their_indices_in_order() {
    let (w, h) = (6, 5);
    let batch = load_memory(w, h, &[2, 0], plain(), &gray_view(h, w));
    let (images, mask) = memory_pairs(w, h, 3, 5);
    let plane = (w * h) as usize;
    assert_eq!(batch.kept, vec![0, 1]);
    assert_eq!(&batch.masks[..plane], &mask[2 * plane..]);
    assert_eq!(&batch.masks[plane..], &mask[..plane]);
    assert!((batch.pixels[plane] - images[0] as f32 / 255.0).abs() < 1e-6);
}

#[test]
fn photometric_steps_follow_mmseg() {
    let close = |a: [f32; 3], b: [f32; 3]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3);
    assert_eq!(distort([10.0, 250.0, 100.0], Photometric::Brightness { delta: 20.0 }, true), [30.0, 255.0, 120.0]);
    assert_eq!(distort([10.0, 200.0, 100.0], Photometric::Contrast { alpha: 1.5 }, true), [15.0, 255.0, 150.0]);
    // Saturation 0: every channel at the value (the maximum).
    assert!(close(distort([200.0, 50.0, 100.0], Photometric::Saturation { alpha: 0.0 }, true), [200.0; 3]));
    // Half the saturation: the minimum moves halfway to the maximum, hue kept.
    assert!(close(distort([200.0, 50.0, 100.0], Photometric::Saturation { alpha: 0.5 }, true), [200.0, 125.0, 150.0]));
    // Hue +30 OpenCV units = +60 degrees: red -> yellow; -60 units wraps to blue.
    assert!(close(distort([255.0, 0.0, 0.0], Photometric::Hue { delta: 30.0 }, true), [255.0, 255.0, 0.0]));
    assert!(close(distort([255.0, 0.0, 0.0], Photometric::Hue { delta: -60.0 }, true), [0.0, 0.0, 255.0]));
    // A gray image has no saturation or hue to change.
    assert_eq!(distort([90.0; 3], Photometric::Saturation { alpha: 2.0 }, false), [90.0; 3]);
}

#[test]
fn bad_requests_are_config_errors() {
    let (images, mask) = memory_pairs(4, 4, 1, 5);
    let sources = gray_pairs(&images, &mask[..15], 4, 4, &[0]);
    let err = load_pairs(&pool(), &sources, &[plain()], &gray_view(4, 4), &masks(5, false), 1 << 26).err().unwrap();
    assert!(err.to_string().contains("15 mask bytes"), "{err}");
    let sources = gray_pairs(&images, &mask, 4, 4, &[0]);
    let bad_crop = PairAugment { crop: vec![[1.0, 0.0]], ..plain() };
    let err = load_pairs(&pool(), &sources, &[bad_crop], &gray_view(4, 4), &masks(5, false), 1 << 26).err().unwrap();
    assert!(err.to_string().contains("must lie in [0, 1)"), "{err}");
    let err = load_pairs(&pool(), &sources, &[plain()], &gray_view(4, 4), &masks(256, false), 1 << 26).err().unwrap();
    assert!(err.to_string().contains("numLabels must be in [1, 255]"), "{err}");
    // A view past the decode budget is refused before its buffers are allocated.
    let err = load_pairs(&pool(), &sources, &[plain()], &gray_view(4, 4), &masks(5, false), 15).err().unwrap();
    assert!(err.to_string().contains("size 4x4 has more pixels than the decode budget of 15"), "{err}");
}

#[test]
fn whole_pairs_rescale_the_image_and_keep_the_mask_as_stored() {
    let (w, h) = (20, 10);
    let (images, mask) = memory_pairs(w, h, 2, 5);
    let sources = gray_pairs(&images, &mask, h, w, &[1]);
    // Fit into [long 10, short 5]: half size. The view's own size plays no part.
    let rescale = Some(Rescale { scale: [10.0, 5.0], ratio: 1.0, fit: false });
    let view = ViewSpec { interpolation: Interpolation::Nearest, ..gray_view(1, 1) };
    let batch = load_whole_pairs(&pool(), &sources, rescale, &view, &masks(5, false), 1 << 26).unwrap();
    let pair = &batch.pairs[0];
    assert_eq!((pair.size, pair.mask_size), ([5, 10], [10, 20]));
    assert_eq!(pair.mask, mask[(w * h) as usize..]);
    assert_eq!(pair.pixels.len(), 50);
    // Nearest halving samples pixel centres: output (x, y) is source (2x + 1, 2y + 1).
    assert_eq!((pair.pixels[10 + 3] * 255.0).round() as u32, 10 * 7 + 3 + 1);
    let unscaled = load_whole_pairs(&pool(), &sources, None, &view, &masks(5, false), 1 << 26).unwrap();
    assert_eq!(unscaled.pairs[0].size, [10, 20]);
}
