//! Convolution pieces for the dVAE and the segmentation head, in NHWC layout: a "same"
//! convolution, 2x2 max-pooling and 2x nearest upsampling, each a custom op with a backward
//! pass. A k x k convolution is im2col and one matmul both ways (dX via col2im), chunk by chunk
//! of images, so candle's threaded GEMM does the work (candle's own CPU conv backward is a
//! direct loop, far too slow for training). On a GPU they are candle's own ops in NCHW, which
//! have CUDA kernels and backward passes.

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::float::Float;
use crate::ops::{add_bias, contiguous, dispatch_float, into_storage, same_dtype_slices, sum_rows};

fn nhwc(layout: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    match layout.dims() {
        &[b, h, w, c] => Ok((b, h, w, c)),
        d => bail!("{op}: expected an NHWC tensor, got shape {d:?}"),
    }
}

/// Patches of a k x k window with zero padding (k-1)/2 and stride 1:
/// [B, H, W, C] -> [B, H, W, k*k*C], channel fastest, then window column, then window row.
struct Im2Col {
    k: usize,
}

fn im2col<T: Float>(x: &[T], (b, h, w, c): (usize, usize, usize, usize), k: usize) -> Vec<T> {
    let pad = (k - 1) / 2;
    let row = k * k * c;
    let mut cols = vec![T::ZERO; b * h * w * row];
    cols.par_chunks_mut(w * row).enumerate().for_each(|(by, out)| {
        let (bi, y) = (by / h, by % h);
        for x_ in 0..w {
            let dst = &mut out[x_ * row..(x_ + 1) * row];
            for ky in 0..k {
                let sy = y as isize + ky as isize - pad as isize;
                if sy < 0 || sy >= h as isize {
                    continue;
                }
                for kx in 0..k {
                    let sx = x_ as isize + kx as isize - pad as isize;
                    if sx < 0 || sx >= w as isize {
                        continue;
                    }
                    let src = ((bi * h + sy as usize) * w + sx as usize) * c;
                    let o = (ky * k + kx) * c;
                    dst[o..o + c].copy_from_slice(&x[src..src + c]);
                }
            }
        }
    });
    cols
}

/// Adjoint of [`im2col`]: sums each window entry back onto the pixel it was copied from.
fn col2im<T: Float>(cols: &[T], (b, h, w, c): (usize, usize, usize, usize), k: usize) -> Vec<T> {
    let pad = (k - 1) / 2;
    let row = k * k * c;
    let mut x = vec![T::ZERO; b * h * w * c];
    // Each task owns one output image row and gathers from the window rows that read it.
    x.par_chunks_mut(w * c).enumerate().for_each(|(by, out)| {
        let (bi, y) = (by / h, by % h);
        for ky in 0..k {
            let cy = y as isize - ky as isize + pad as isize;
            if cy < 0 || cy >= h as isize {
                continue;
            }
            for x_ in 0..w {
                let dst = &mut out[x_ * c..(x_ + 1) * c];
                for kx in 0..k {
                    let cx = x_ as isize - kx as isize + pad as isize;
                    if cx < 0 || cx >= w as isize {
                        continue;
                    }
                    let src = ((bi * h + cy as usize) * w + cx as usize) * row + (ky * k + kx) * c;
                    for (d, &s) in dst.iter_mut().zip(&cols[src..src + c]) {
                        *d += s;
                    }
                }
            }
        }
    });
    x
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = nhwc(l, self.name())?;
        let out =
            dispatch_float!(self.name(), s, |v| into_storage(im2col(contiguous(v, l, self.name())?, dims, self.k)));
        let (b, h, w, c) = dims;
        Ok((out, Shape::from((b, h, w, self.k * self.k * c))))
    }
}

struct Col2Im {
    k: usize,
    dims: (usize, usize, usize, usize),
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = self.dims;
        let out = dispatch_float!(self.name(), s, |v| into_storage(col2im(
            contiguous(v, l, self.name())?,
            self.dims,
            self.k
        )));
        Ok((out, Shape::from((b, h, w, c))))
    }
}

/// Most im2col elements one candle CUDA convolution may produce. Its im2col kernel indexes the
/// column buffer with a 32-bit thread index and its launch size is the element count cast to
/// u32, so past 2^32 elements most of the buffer is silently never written (the `dall-e`
/// encoder's 3x3 convolutions at 112 px pass that from batch 149 on). Half of that, to be safe.
pub const GPU_IM2COL_LIMIT: usize = 1 << 31;

/// `f` over consecutive slices of at most `per_chunk` images of `x` (dim 0), concatenated;
/// differentiable (each chunk's backward is again a chunk-sized convolution).
pub fn in_batch_chunks(
    x: &Tensor,
    per_chunk: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let b = x.dim(0)?;
    if b <= per_chunk {
        return f(x);
    }
    let parts = (0..b)
        .step_by(per_chunk)
        .map(|start| f(&x.narrow(0, start, per_chunk.min(b - start))?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// k x k convolution, stride 1, zero padding (k-1)/2, on NHWC input. `weight` keeps the
/// PyTorch layout [C_out, C_in, k, k] (as checkpoints store it).
pub fn conv2d_same(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let c = x.dim(3)?;
    let (c_out, c_in, k, k2) = weight.dims4()?;
    if c_in != c || k != k2 || k % 2 == 0 {
        bail!("conv2d: input has {c} channels, weight is [{c_out}, {c_in}, {k}, {k2}] (expected odd square kernels)");
    }
    if !x.device().is_cpu() {
        let (_, h, w, _) = x.dims4()?;
        let per_chunk = (GPU_IM2COL_LIMIT / (c_in * k * k * h * w)).max(1);
        return in_batch_chunks(x, per_chunk, |x| {
            // On a GPU: candle's convolution (im2col + cuBLAS, with its backward), in NCHW.
            let y = x.permute((0, 3, 1, 2))?.contiguous()?.conv2d(weight, (k - 1) / 2, 1, 1, 1)?;
            y.permute((0, 2, 3, 1))?.broadcast_add(bias)
        });
    }
    if let Some(y) = crate::ops::bf16_on_cpu_via_f32(&[x, weight, bias], |t| conv2d_same(&t[0], &t[1], &t[2]))? {
        return Ok(y);
    }
    let x = x.contiguous()?;
    let output = conv_forward(&x.detach(), &weight.detach(), &bias.detach())?;
    x.apply_op3(weight, bias, ConvSame { output })
}

/// [C_out, C_in, k, k] -> [C_out, k*k*C_in], matching the im2col column order.
fn flat_weight(weight: &Tensor) -> candle_core::Result<Tensor> {
    let (c_out, c_in, k, _) = weight.dims4()?;
    if k == 1 {
        weight.reshape((c_out, c_in))
    } else {
        weight.permute((0, 2, 3, 1))?.contiguous()?.reshape((c_out, k * k * c_in))
    }
}

/// im2col rows [B*H*W, k*k*C] of a contiguous NHWC input, outside autograd.
fn columns(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let cols = if k == 1 { x.clone() } else { x.apply_op1_no_bwd(&Im2Col { k })? };
    cols.reshape((b * h * w, k * k * c))
}

/// im2col bytes one CPU convolution materialises at a time: the batch is cut into chunks of
/// whole images under it (at least one image), so the buffer stays small and cache-warm however
/// large the batch (a UperHead's 3x3 bottleneck over 512 channels at 56x56 is 58 MB an image).
const CPU_IM2COL_BYTES: usize = 16 << 20;

/// Images per im2col chunk of a k x k convolution over `x` [B, H, W, C].
fn images_per_chunk(x: &Tensor, k: usize) -> candle_core::Result<usize> {
    let (b, h, w, c) = x.dims4()?;
    if k == 1 {
        return Ok(b); // no column buffer
    }
    let per_image = h * w * k * k * c * x.dtype().size_in_bytes();
    Ok((CPU_IM2COL_BYTES / per_image).clamp(1, b.max(1)))
}

fn conv_forward(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (c_out, _, k, _) = weight.dims4()?;
    let w_t = flat_weight(weight)?.t()?;
    in_batch_chunks(x, images_per_chunk(x, k)?, |x| {
        let (b, h, w, _) = x.dims4()?;
        let y = add_bias(&columns(x, k)?.matmul(&w_t)?, bias)?;
        y.reshape((b, h, w, c_out))
    })
}

/// The convolution as one autograd node. Its forward output is computed outside autograd, so
/// the im2col buffer (k*k times the input) is freed at once; the backward recomputes it.
/// Training then keeps only each conv's input alive, as PyTorch does.
struct ConvSame {
    output: Tensor,
}

impl candle_core::CustomOp3 for ConvSame {
    fn name(&self) -> &'static str {
        "conv2d-same"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let flat = self.output.flatten_all()?;
        let storage = match self.output.dtype() {
            candle_core::DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            candle_core::DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            other => bail!("conv2d: unsupported dtype {other:?}, expected f32 or f64"),
        };
        Ok((storage, self.output.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, weight) = (x.detach(), weight.detach());
        let (b, h, w, c) = x.dims4()?;
        let (c_out, _, k, _) = weight.dims4()?;
        let g = grad.contiguous()?.reshape((b * h * w, c_out))?;
        let w_flat = flat_weight(&weight)?;
        // Chunk by chunk of images, as the forward: dW sums the chunks' products, dX is each
        // chunk's col2im.
        let per = images_per_chunk(&x, k)?;
        let mut dw_flat: Option<Tensor> = None;
        let mut dx_parts = Vec::with_capacity(b.div_ceil(per));
        for start in (0..b).step_by(per) {
            let n = per.min(b - start);
            let (xc, gc) = (x.narrow(0, start, n)?, g.narrow(0, start * h * w, n * h * w)?);
            let part = gc.t()?.matmul(&columns(&xc, k)?)?;
            dw_flat = Some(match dw_flat {
                None => part,
                Some(sum) => (sum + part)?,
            });
            let dcols = gc.matmul(&w_flat)?;
            dx_parts.push(if k == 1 {
                dcols.reshape((n, h, w, c))?
            } else {
                dcols.reshape((n, h, w, k * k * c))?.apply_op1_no_bwd(&Col2Im { k, dims: (n, h, w, c) })?
            });
        }
        let dw_flat = dw_flat.expect("a batch has at least one image");
        let dweight = if k == 1 {
            dw_flat.reshape(weight.shape())?
        } else {
            dw_flat.reshape((c_out, k, k, c))?.permute((0, 3, 1, 2))?.contiguous()?
        };
        let dbias = sum_rows(&g)?;
        let dx = if dx_parts.len() == 1 { dx_parts.pop().expect("one part") } else { Tensor::cat(&dx_parts, 0)? };
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// 2x2 max-pooling, stride 2, NHWC. The gradient goes to the first maximum of each window.
struct MaxPool2;

fn max_pool2_fwd<T: Float>(x: &[T], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
    let (oh, ow) = (h / 2, w / 2);
    let mut y = vec![T::ZERO; b * oh * ow * c];
    y.par_chunks_mut(ow * c).enumerate().for_each(|(boy, out)| {
        let (bi, oy) = (boy / oh, boy % oh);
        for ox in 0..ow {
            for ch in 0..c {
                let at = |dy: usize, dx: usize| x[((bi * h + 2 * oy + dy) * w + 2 * ox + dx) * c + ch];
                let mut m = at(0, 0);
                for (dy, dx) in [(0, 1), (1, 0), (1, 1)] {
                    if at(dy, dx) > m {
                        m = at(dy, dx);
                    }
                }
                out[ox * c + ch] = m;
            }
        }
    });
    y
}

fn max_pool2_bwd<T: Float>(x: &[T], y: &[T], g: &[T], (_, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
    let (oh, ow) = (h / 2, w / 2);
    let mut dx = vec![T::ZERO; x.len()];
    // Each task owns the two input rows of one output row.
    dx.par_chunks_mut(2 * w * c).enumerate().for_each(|(boy, out)| {
        let (bi, oy) = (boy / oh, boy % oh);
        for ox in 0..ow {
            for ch in 0..c {
                let o = ((bi * oh + oy) * ow + ox) * c + ch;
                for (dy, dx_) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let i = ((bi * h + 2 * oy + dy) * w + 2 * ox + dx_) * c + ch;
                    if x[i] == y[o] {
                        out[(dy * w + 2 * ox + dx_) * c + ch] = g[o];
                        break;
                    }
                }
            }
        }
    });
    dx
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = nhwc(l, self.name())?;
        if h % 2 != 0 || w % 2 != 0 {
            bail!("max-pool-2x2: height and width must be even, got {h}x{w}");
        }
        let out = dispatch_float!(self.name(), s, |v| into_storage(max_pool2_fwd(
            contiguous(v, l, self.name())?,
            (b, h, w, c)
        )));
        Ok((out, Shape::from((b, h / 2, w / 2, c))))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(y, &grad.contiguous()?, &MaxPool2Backward)?))
    }
}

struct MaxPool2Backward;

impl candle_core::CustomOp3 for MaxPool2Backward {
    fn name(&self) -> &'static str {
        "max-pool-2x2-backward"
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
        let dims = nhwc(l1, self.name())?;
        let out = dispatch_float!(self.name(), s1, |x| into_storage(max_pool2_bwd(
            contiguous(x, l1, self.name())?,
            same_dtype_slices(self.name(), s2, l2)?,
            same_dtype_slices(self.name(), s3, l3)?,
            dims
        )));
        Ok((out, l1.shape().clone()))
    }
}

pub fn max_pool2(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.permute((0, 3, 1, 2))?.contiguous()?.max_pool2d(2)?.permute((0, 2, 3, 1))?.contiguous();
    }
    if let Some(y) = crate::ops::bf16_on_cpu_via_f32(&[x], |t| max_pool2(&t[0]))? {
        return Ok(y);
    }
    x.contiguous()?.apply_op1(MaxPool2)
}

/// 2x nearest-neighbour upsampling, NHWC. Backward sums each 2x2 block.
struct Upsample2;

fn upsample2_fwd<T: Float>(x: &[T], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
    let mut y = vec![T::ZERO; b * 4 * h * w * c];
    y.par_chunks_mut(2 * w * c).enumerate().for_each(|(boy, out)| {
        let (bi, iy) = (boy / (2 * h), boy % (2 * h) / 2);
        for ix in 0..w {
            let src = &x[((bi * h + iy) * w + ix) * c..][..c];
            out[2 * ix * c..][..c].copy_from_slice(src);
            out[(2 * ix + 1) * c..][..c].copy_from_slice(src);
        }
    });
    y
}

fn upsample2_bwd<T: Float>(g: &[T], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
    let mut dx = vec![T::ZERO; b * h * w * c];
    dx.par_chunks_mut(w * c).enumerate().for_each(|(biy, out)| {
        let (bi, iy) = (biy / h, biy % h);
        for ix in 0..w {
            for (dy, dx_) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let src = &g[((bi * 2 * h + 2 * iy + dy) * 2 * w + 2 * ix + dx_) * c..][..c];
                for (d, &s) in out[ix * c..][..c].iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
    });
    dx
}

impl CustomOp1 for Upsample2 {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = nhwc(l, self.name())?;
        let out = dispatch_float!(self.name(), s, |v| into_storage(upsample2_fwd(
            contiguous(v, l, self.name())?,
            (b, h, w, c)
        )));
        Ok((out, Shape::from((b, 2 * h, 2 * w, c))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, h, w, c) = x.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Upsample2Backward { dims: (b, h, w, c) })?))
    }
}

struct Upsample2Backward {
    dims: (usize, usize, usize, usize),
}

impl CustomOp1 for Upsample2Backward {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = self.dims;
        let out =
            dispatch_float!(self.name(), s, |v| into_storage(upsample2_bwd(contiguous(v, l, self.name())?, self.dims)));
        Ok((out, Shape::from((b, h, w, c))))
    }
}

pub fn upsample2(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        let (_, h, w, _) = x.dims4()?;
        let y = x.permute((0, 3, 1, 2))?.contiguous()?.upsample_nearest2d(2 * h, 2 * w)?;
        return y.permute((0, 2, 3, 1))?.contiguous();
    }
    if let Some(y) = crate::ops::bf16_on_cpu_via_f32(&[x], |t| upsample2(&t[0]))? {
        return Ok(y);
    }
    x.contiguous()?.apply_op1(Upsample2)
}
