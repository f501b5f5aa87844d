//! Per-pixel cross-entropy, and class ids, of logits resized bilinearly to the labels' size,
//! fused: the same numbers as `resample(.., Bilinear, ..)` followed by `cross_entropy_rows` (or
//! argmax), without the resized [B, H, W, K] logits ever existing. transformers' segmentation
//! loss upsamples 1/4-scale logits to the label size (16x the pixels: 157 MB per image at 512
//! px and 150 classes) and reads each pixel's K values once; here each output pixel reads its
//! four taps instead.
//!
//! logits [B, h, w, K] (NHWC), labels u32 [B, H, W] -> losses [B, H, W], 0 at ignored pixels.
//! The backward pass recomputes each pixel's softmax and scatters (softmax - onehot) x g over
//! its four taps. Output rows whose upper tap is low-resolution row r write rows r and r + 1,
//! so rows are processed in two passes (even r, then odd r) whose tasks touch disjoint rows:
//! no locks, no per-thread copies, the same sums in the same order on every run. The CUDA
//! kernels run a block per output pixel and add the gradients atomically.

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::{cuda_backend::cudarc::driver::CudaSlice, CudaDevice, CudaStorage};

use super::resample::{axis_taps, Taps};
use super::*;
use crate::engine::simd::{max, multiversion, sum, Real};

struct Geometry<T> {
    batch: usize,
    low: (usize, usize),
    high: (usize, usize),
    classes: usize,
    rows: Vec<Taps<T>>,
    cols: Vec<Taps<T>>,
}

impl<T: Real> Geometry<T> {
    fn new(logits: &Layout, labels: &Layout, op: &str) -> candle_core::Result<Self> {
        let (batch, ..) = logits.shape().dims4()?;
        let (label_batch, high_h, high_w) = labels.shape().dims3()?;
        if label_batch != batch {
            bail!("{op}: {label_batch} label maps for {batch} logit maps");
        }
        Self::with_size(logits, (high_h, high_w))
    }

    fn with_size(logits: &Layout, (high_h, high_w): (usize, usize)) -> candle_core::Result<Self> {
        let (batch, h, w, classes) = logits.shape().dims4()?;
        Ok(Self {
            batch,
            low: (h, w),
            high: (high_h, high_w),
            classes,
            rows: axis_taps(h, high_h),
            cols: axis_taps(w, high_w),
        })
    }

    /// Each output row's and then each output column's two taps, indices and weights, on the
    /// device, as the CUDA kernels read them.
    #[cfg(feature = "cuda")]
    fn tables(&self, dev: &CudaDevice) -> candle_core::Result<(CudaSlice<u32>, CudaSlice<f32>)> {
        let taps = self.rows.iter().chain(&self.cols);
        let indices: Vec<u32> = taps.clone().flat_map(|t| [t.first as u32, t.second as u32]).collect();
        let weights: Vec<f32> = taps.flat_map(|t| t.weights.map(|w| w.to_f64() as f32)).collect();
        Ok((dev.clone_htod(&indices)?, dev.clone_htod(&weights)?))
    }

    /// The launch arguments the kernels share: low and high sizes and the class count.
    #[cfg(feature = "cuda")]
    fn sizes(&self) -> [i32; 5] {
        [self.low.0, self.low.1, self.high.0, self.high.1, self.classes].map(|n| n as i32)
    }

    /// The resized logits of output pixel (y, x) of one image's low-resolution map, into `z`.
    fn resize_pixel(&self, image: &[T], y: usize, x: usize, z: &mut [T]) {
        let (w, k) = (self.low.1, self.classes);
        let (r, c) = (self.rows[y], self.cols[x]);
        let at = |row: usize, col: usize| &image[(row * w + col) * k..][..k];
        let taps = [at(r.first, c.first), at(r.first, c.second), at(r.second, c.first), at(r.second, c.second)];
        interpolate(z, taps, r.weights, c.weights);
    }
}

multiversion! {
    /// z = (a00 wy0 + a10 wy1) wx0 + (a01 wy0 + a11 wy1) wx1: the separable resize's rows, then
    /// columns, with taps [a00, a01, a10, a11] (row, column).
    fn interpolate<T>(z: &mut [T], taps: [&[T]; 4], wy: [T; 2], wx: [T; 2]) {
        let [a00, a01, a10, a11] = taps;
        for i in 0..z.len() {
            z[i] = (a00[i] * wy[0] + a10[i] * wy[1]) * wx[0] + (a01[i] * wy[0] + a11[i] * wy[1]) * wx[1];
        }
    }
}

multiversion! {
    /// Returns the cross-entropy of logits `z` against class `t`, and turns `z` in place into
    /// its gradient times `g`: (softmax(z) - onehot(t)) g.
    fn cross_entropy_and_gradient<T>(z: &mut [T], t: usize, g: T) -> T {
        let m = max(z);
        let zt = z[t];
        for v in z.iter_mut() {
            *v = (*v - m).exp_v();
        }
        let total = sum(z);
        let scale = g / total;
        for v in z.iter_mut() {
            *v = *v * scale;
        }
        z[t] = z[t] - g;
        m + total.ln() - zt
    }
}

multiversion! {
    /// out += d w.
    fn add_scaled<T>(out: &mut [T], d: &[T], w: T) {
        for i in 0..out.len() {
            out[i] += d[i] * w;
        }
    }
}

struct ResizedCrossEntropy {
    ignore: u32,
}

fn forward<T: Real>(g: &Geometry<T>, logits: &[T], labels: &[u32], ignore: u32) -> Vec<T> {
    let ((h, w), (high_h, high_w), k) = (g.low, g.high, g.classes);
    let mut losses = vec![T::ZERO; labels.len()];
    losses.par_chunks_mut(high_w).zip(labels.par_chunks(high_w)).enumerate().for_each(|(row, (out, targets))| {
        let (b, y) = (row / high_h, row % high_h);
        let image = &logits[b * h * w * k..][..h * w * k];
        let mut z = vec![T::ZERO; k];
        for (x, (loss, &t)) in out.iter_mut().zip(targets).enumerate() {
            if t != ignore {
                g.resize_pixel(image, y, x, &mut z);
                *loss = cross_entropy_and_gradient(&mut z, t as usize, T::ZERO);
            }
        }
    });
    losses
}

impl CustomOp2 for ResizedCrossEntropy {
    fn name(&self) -> &'static str {
        "resized-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let labels = u32_slice(self.name(), s2, l2)?;
        let k = l1.shape().dims4()?.3;
        if let Some(&bad) = labels.iter().find(|&&t| t != self.ignore && t as usize >= k) {
            bail!("{}: label {bad} out of range for {k} classes", self.name());
        }
        let out = dispatch_float!(self.name(), s1, |z| {
            let g = Geometry::new(l1, l2, self.name())?;
            into_storage(forward(&g, contiguous(z, l1, self.name())?, labels, self.ignore))
        });
        Ok((out, l2.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    /// Labels are not range-checked on the device: the callers validate them on the host.
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use crate::cuda::*;
        let g = Geometry::<f32>::new(l1, l2, self.name())?;
        let dev = s1.device();
        let (z, labels) = (input::<f32>(self.name(), s1, l1)?, u32_in(self.name(), s2, l2)?);
        let (taps, weights) = g.tables(dev)?;
        let [h, w, high_h, high_w, k] = g.sizes();
        let pixels = l2.shape().elem_count();
        let loss = output::<f32>(dev, pixels)?;
        launch!(
            dev,
            "resized_cross_entropy_fwd",
            per_row(pixels, g.classes),
            [&z, &labels, &taps, &weights, &loss, &h, &w, &high_h, &high_w, &k, &self.ignore]
        )?;
        Ok((storage(loss, dev), l2.shape().clone()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _losses: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = ResizedCrossEntropyBackward { ignore: self.ignore };
        Ok((Some(logits.apply_op3_no_bwd(labels, &grad.contiguous()?, &op)?), None))
    }
}

/// d losses / d logits, weighted by the incoming per-pixel gradient.
struct ResizedCrossEntropyBackward {
    ignore: u32,
}

fn backward<T: Real>(g: &Geometry<T>, logits: &[T], labels: &[u32], grad: &[T], ignore: u32) -> Vec<T> {
    let ((h, w), (high_h, high_w), k) = (g.low, g.high, g.classes);
    let image_len = h * w * k;
    let row_len = w * k;
    let mut dlogits = vec![T::ZERO; g.batch * image_len];
    // Output rows by their upper tap's low-resolution row.
    let mut rows_of = vec![Vec::new(); h];
    for (y, taps) in g.rows.iter().enumerate() {
        rows_of[taps.first].push(y);
    }
    dlogits.par_chunks_mut(image_len).enumerate().for_each(|(b, dimage)| {
        let image = &logits[b * image_len..][..image_len];
        for parity in 0..2 {
            // Task r owns low-resolution rows r and r + 1 (the last one may own r alone).
            dimage[parity * row_len..].par_chunks_mut(2 * row_len).enumerate().for_each(|(pair, drows)| {
                let r = parity + 2 * pair;
                let mut z = vec![T::ZERO; k];
                for &y in &rows_of[r] {
                    let taps_y = g.rows[y];
                    let local = [0, taps_y.second - r];
                    for x in 0..high_w {
                        let pixel = (b * high_h + y) * high_w + x;
                        let t = labels[pixel];
                        if t == ignore {
                            continue;
                        }
                        g.resize_pixel(image, y, x, &mut z);
                        cross_entropy_and_gradient(&mut z, t as usize, grad[pixel]);
                        let taps_x = g.cols[x];
                        for (row, wy) in local.iter().zip(taps_y.weights) {
                            for (col, wx) in [taps_x.first, taps_x.second].into_iter().zip(taps_x.weights) {
                                add_scaled(&mut drows[row * row_len + col * k..][..k], &z, wy * wx);
                            }
                        }
                    }
                }
            });
        }
    });
    dlogits
}

impl CustomOp3 for ResizedCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "resized-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let labels = u32_slice(self.name(), s2, l2)?;
        let out = dispatch_float!(self.name(), s1, |z| {
            let g = Geometry::new(l1, l2, self.name())?;
            let grad = same_dtype_slices(self.name(), s3, l3)?;
            into_storage(backward(&g, contiguous(z, l1, self.name())?, labels, grad, self.ignore))
        });
        Ok((out, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use crate::cuda::*;
        let g = Geometry::<f32>::new(l1, l2, self.name())?;
        let dev = s1.device();
        let (z, labels, grad) =
            (input::<f32>(self.name(), s1, l1)?, u32_in(self.name(), s2, l2)?, input::<f32>(self.name(), s3, l3)?);
        let (taps, weights) = g.tables(dev)?;
        let [h, w, high_h, high_w, k] = g.sizes();
        let dz = zeros(dev, l1.shape().elem_count())?;
        launch!(
            dev,
            "resized_cross_entropy_bwd",
            per_row(l2.shape().elem_count(), g.classes),
            [&z, &labels, &taps, &weights, &grad, &dz, &h, &w, &high_h, &high_w, &k, &self.ignore]
        )?;
        Ok((storage(dz, dev), l1.shape().clone()))
    }
}

/// Per-pixel cross-entropy [B, H, W] of `logits` [B, h, w, K] resized bilinearly (align_corners
/// = false) to the size of `labels` [B, H, W] (u32); 0 with no gradient where the label is
/// `ignore`. Labels other than `ignore` must be below K. f32 and f64 on the CPU, f32 on CUDA.
pub fn resized_cross_entropy(logits: &Tensor, labels: &Tensor, ignore: u32) -> candle_core::Result<Tensor> {
    if labels.dtype() != DType::U32 {
        bail!("resized cross-entropy: labels must be u32, got {:?}", labels.dtype());
    }
    logits.contiguous()?.apply_op2(&labels.contiguous()?, ResizedCrossEntropy { ignore })
}

struct ResizedArgmax {
    size: (usize, usize),
}

multiversion! {
    /// The index of the first maximum of `z`.
    fn first_argmax<T>(z: &[T]) -> u32 {
        let mut best = 0;
        for i in 1..z.len() {
            if z[i] > z[best] {
                best = i;
            }
        }
        best as u32
    }
}

fn argmax<T: Real>(g: &Geometry<T>, logits: &[T]) -> Vec<u32> {
    let ((h, w), (high_h, high_w), k) = (g.low, g.high, g.classes);
    let mut classes = vec![0u32; g.batch * high_h * high_w];
    classes.par_chunks_mut(high_w).enumerate().for_each(|(row, out)| {
        let (b, y) = (row / high_h, row % high_h);
        let image = &logits[b * h * w * k..][..h * w * k];
        let mut z = vec![T::ZERO; k];
        for (x, class) in out.iter_mut().enumerate() {
            g.resize_pixel(image, y, x, &mut z);
            *class = first_argmax(&z);
        }
    });
    classes
}

impl candle_core::CustomOp1 for ResizedArgmax {
    fn name(&self) -> &'static str {
        "resized-argmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from((l.shape().dims4()?.0, self.size.0, self.size.1));
        let classes = dispatch_float!(self.name(), s, |z| {
            let g = Geometry::with_size(l, self.size)?;
            argmax(&g, contiguous(z, l, self.name())?)
        });
        Ok((CpuStorage::U32(classes), shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use crate::cuda::*;
        let g = Geometry::<f32>::with_size(l, self.size)?;
        let dev = s.device();
        let z = input::<f32>(self.name(), s, l)?;
        let (taps, weights) = g.tables(dev)?;
        let [h, w, high_h, high_w, k] = g.sizes();
        let pixels = g.batch * self.size.0 * self.size.1;
        // SAFETY: the kernel writes one id per pixel.
        let classes = unsafe { dev.alloc::<u32>(pixels) }?;
        launch!(
            dev,
            "resized_argmax",
            per_row(pixels, g.classes),
            [&z, &taps, &weights, &classes, &h, &w, &high_h, &high_w, &k]
        )?;
        Ok((CudaStorage::wrap_cuda_slice(classes, dev.clone()), Shape::from((g.batch, self.size.0, self.size.1))))
    }
}

/// Class ids [B, H, W] (u32, the first maximum): the argmax over K of `logits` [B, h, w, K]
/// resized bilinearly (align_corners = false) to `size` (H, W). f32 and f64 on the CPU, f32 on CUDA.
pub fn resized_argmax(logits: &Tensor, size: (usize, usize)) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1_no_bwd(&ResizedArgmax { size })
}
