//! Convolution pieces for the dVAE and the segmentation head on candle's autograd, in NHWC
//! layout: a "same" convolution, 2x2 max-pooling and 2x nearest upsampling, each a custom op
//! with a backward pass. On the CPU the convolution runs the engine's tiled im2col (or, for 3x3
//! kernels, Winograd) GEMMs both ways (candle's own CPU conv backward is a direct loop, far too
//! slow for training). On a GPU it is beit's NHWC im2col kernel, one cuBLAS GEMM and a fused
//! bias add ([`conv2d_same_by_columns`]); pooling and upsampling have NHWC kernels too, so no
//! tensor is ever permuted to candle's NCHW.

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use crate::cuda::Scalar;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use crate::config::Precision;
use crate::engine::conv::{self as kernels, Nhwc};
use crate::engine::simd::Real;
use crate::ops::{contiguous, dispatch_float, into_storage, same_dtype_slices, with_row_vector};

fn nhwc(layout: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    match layout.dims() {
        &[b, h, w, c] => Ok((b, h, w, c)),
        d => bail!("{op}: expected an NHWC tensor, got shape {d:?}"),
    }
}

/// Most column-matrix elements one GPU convolution materialises at a time: 4 GiB of bf16
/// columns, and every index, grid size and GEMM dimension within 32 bits (the `dall-e`
/// encoder's 3x3 convolutions at 112 px pass 2^32 from batch 149 on).
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

/// (C_out, k) of a [C_out, C_in, k, k] kernel for an input of `c` channels.
fn check_kernel(c: usize, weight: &Tensor) -> candle_core::Result<(usize, usize)> {
    let (c_out, c_in, k, k2) = weight.dims4()?;
    if c_in != c || k != k2 || k % 2 == 0 {
        bail!("conv2d: input has {c} channels, weight is [{c_out}, {c_in}, {k}, {k2}] (expected odd square kernels)");
    }
    Ok((c_out, k))
}

/// k x k convolution, stride 1, zero padding (k-1)/2, on NHWC input. `weight` keeps the
/// PyTorch layout [C_out, C_in, k, k] (as checkpoints store it). `gemm`: the precision of the
/// CPU engine's GEMM inputs, both ways (bf16 takes f32 tensors: the engine's mixed precision);
/// a GPU's GEMMs run in the tensors' dtype.
pub fn conv2d_same(x: &Tensor, weight: &Tensor, bias: &Tensor, gemm: Precision) -> candle_core::Result<Tensor> {
    check_kernel(x.dim(3)?, weight)?;
    if !x.device().is_cpu() {
        return conv2d_same_by_columns(x, weight, bias);
    }
    if let Some(y) = crate::ops::bf16_on_cpu_via_f32(&[x, weight, bias], |t| conv2d_same(&t[0], &t[1], &t[2], gemm))? {
        return Ok(y);
    }
    if gemm == Precision::Bf16 && x.dtype() != candle_core::DType::F32 {
        bail!("conv2d: bf16 GEMMs on the CPU take f32 tensors, got {:?}", x.dtype());
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, ConvSame { gemm })
}

/// [`conv2d_same`] as the GPU computes it: the [pixels, k*k*C_in] column matrix ([`im2col`];
/// the input itself for 1x1 kernels), one GEMM with the kernel as a [k*k*C_in, C_out] matrix,
/// and the bias, in batch chunks under [`GPU_IM2COL_LIMIT`]. One autograd node per chunk that
/// keeps only its input: the columns live inside the forward and are rebuilt in the backward,
/// as PyTorch's convolutions do, so a network's activations, not k*k times them, stay on the
/// GPU. Runs on the CPU too (f32/f64), for the tests.
pub fn conv2d_same_by_columns(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (_, h, w, c) = x.dims4()?;
    let (c_out, k) = check_kernel(c, weight)?;
    let kernel = weight.permute((2, 3, 1, 0))?.reshape((k * k * c, c_out))?;
    let bias = bias.contiguous()?;
    let per_chunk = (GPU_IM2COL_LIMIT / (k * k * c * h * w)).max(1);
    in_batch_chunks(x, per_chunk, |x| x.contiguous()?.apply_op3(&kernel, &bias, ConvByColumns { k }))
}

/// (x [B, H, W, C_in], kernel [k*k*C_in, C_out], bias [C_out]) -> [B, H, W, C_out].
struct ConvByColumns {
    k: usize,
}

impl ConvByColumns {
    /// The input's dimensions and the GEMM's (pixels, k*k*C_in, C_out).
    fn dims(&self, x: &Layout, kernel: &Layout) -> candle_core::Result<(Nhwc, (usize, usize, usize))> {
        let s = nhwc_of(x, self.name())?;
        match kernel.dims() {
            &[row, c_out] if row == self.k * self.k * s.c => Ok((s, (s.pixels(), row, c_out))),
            d => bail!("{}: expected a [{}, C_out] kernel matrix, got shape {d:?}", self.name(), self.k * self.k * s.c),
        }
    }
}

impl CustomOp3 for ConvByColumns {
    fn name(&self) -> &'static str {
        "conv2d-by-columns"
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
        let (s, (pixels, row, c_out)) = self.dims(l1, l2)?;
        let columns = dispatch_float!(self.name(), s1, |v| into_storage(im2col_values(
            contiguous(v, l1, self.name())?,
            s,
            self.k
        )));
        let y = columns.matmul(s2, (1, pixels, c_out, row), &Layout::contiguous((pixels, row)), l2)?;
        let out = dispatch_float!(self.name(), &y, |v| into_storage(with_row_vector(
            v,
            same_dtype_slices(self.name(), s3, l3)?,
            |a, b| a + b
        )));
        Ok((out, Shape::from((s.b, s.h, s.w, c_out))))
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
        let (s, (pixels, row, c_out)) = self.dims(l1, l2)?;
        let columns_layout = Layout::contiguous((pixels, row));
        let y = if self.k == 1 {
            s1.matmul(s2, (1, pixels, c_out, row), l1, l2)?
        } else {
            columns_on_gpu(self.name(), s1, l1, s, self.k)?.matmul(s2, (1, pixels, c_out, row), &columns_layout, l2)?
        };
        let y_layout = Layout::contiguous((pixels, c_out));
        let bias_width = [Scalar::I32(c_out as i32)];
        let (out, _) = crate::cuda::same_shape(
            self.name(),
            "add_bias",
            &[(&y, &y_layout), (s3, l3)],
            crate::cuda::Walk::Elements,
            &bias_width,
        )?;
        Ok((out, Shape::from((s.b, s.h, s.w, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let input = nhwc_of(x.layout(), self.name())?;
        let dy = grad.contiguous()?.reshape((input.pixels(), kernel.dim(1)?))?;
        let columns = match self.k {
            1 => x.detach().reshape((input.pixels(), input.c))?,
            k => x.apply_op1_no_bwd(&Im2col { k })?,
        };
        let dkernel = columns.t()?.matmul(&dy)?;
        let dcolumns = dy.matmul(&kernel.detach().t()?)?;
        let dx = match self.k {
            1 => dcolumns.reshape(x.shape())?,
            k => dcolumns.apply_op1_no_bwd(&Col2im { input, k })?,
        };
        let dbias = crate::ops::sum_rows(&dy)?.to_dtype(bias.dtype())?;
        Ok((Some(dx), Some(dkernel), Some(dbias)))
    }
}

/// [B, H, W, C] -> the [B*H*W, k*k*C] columns of a k x k "same" convolution: row (b, y, x)
/// holds x[b, y+ky-p, x+kx-p, :] for the taps (ky, kx) in row-major order, zero outside the
/// image. Differentiable (the backward sums each input pixel's entries back).
pub fn im2col(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Im2col { k })
}

struct Im2col {
    k: usize,
}

fn im2col_values<T: Real>(x: &[T], s: Nhwc, k: usize) -> Vec<T> {
    let (c, row) = (s.c, k * k * s.c);
    let mut columns = vec![T::ZERO; s.pixels() * row];
    columns.par_chunks_mut(row).enumerate().for_each(|(pixel, out)| {
        let (image, py, px) = (pixel / (s.h * s.w), pixel / s.w % s.h, pixel % s.w);
        for (tap, out) in out.chunks_mut(c).enumerate() {
            if let Some((sy, sx)) = tap_source(py, px, tap, k, s) {
                out.copy_from_slice(&x[((image * s.h + sy) * s.w + sx) * c..][..c]);
            }
        }
    });
    columns
}

/// The input pixel that output pixel (py, px) reads at `tap`, if inside the image.
fn tap_source(py: usize, px: usize, tap: usize, k: usize, s: Nhwc) -> Option<(usize, usize)> {
    let p = (k - 1) / 2;
    let (sy, sx) = ((py + tap / k).checked_sub(p)?, (px + tap % k).checked_sub(p)?);
    (sy < s.h && sx < s.w).then_some((sy, sx))
}

/// The adjoint of [`im2col_values`]: each input pixel gets the sum of the column entries that read it.
fn col2im_values<T: Real>(columns: &[T], s: Nhwc, k: usize) -> Vec<T> {
    let (c, row) = (s.c, k * k * s.c);
    let mut dx = vec![T::ZERO; s.len()];
    columns.chunks(row).enumerate().for_each(|(pixel, cols)| {
        let (image, py, px) = (pixel / (s.h * s.w), pixel / s.w % s.h, pixel % s.w);
        for (tap, col) in cols.chunks(c).enumerate() {
            if let Some((sy, sx)) = tap_source(py, px, tap, k, s) {
                for (d, &v) in dx[((image * s.h + sy) * s.w + sx) * c..][..c].iter_mut().zip(col) {
                    *d += v;
                }
            }
        }
    });
    dx
}

/// Pixels of one launch of the per-pixel kernels: the grid's x dimension is 31 bits.
#[cfg(feature = "cuda")]
fn grid_pixels(s: Nhwc, op: &str) -> candle_core::Result<usize> {
    match s.pixels() {
        p if p < 1 << 31 => Ok(p),
        p => bail!("{op}: {p} pixels in one launch, at most 2^31 - 1 (split the batch)"),
    }
}

/// The i32 (h, w, c) of an NHWC shape and the kernel size, as the im2col kernels take them.
#[cfg(feature = "cuda")]
fn image_scalars(s: Nhwc, k: usize) -> [Scalar; 4] {
    [Scalar::I32(s.h as i32), Scalar::I32(s.w as i32), Scalar::I32(s.c as i32), Scalar::I32(k as i32)]
}

/// The [`im2col`] columns of a contiguous CUDA input: copied in 16-byte units when each
/// pixel's channels fill whole units and the input starts on one (a batch chunk may not).
#[cfg(feature = "cuda")]
fn columns_on_gpu(op: &str, x: &CudaStorage, l: &Layout, s: Nhwc, k: usize) -> candle_core::Result<CudaStorage> {
    use crate::cuda::{launch, storage, with_element, Element};
    fn in_units<T: Element>(
        op: &str,
        x: &CudaStorage,
        l: &Layout,
        s: Nhwc,
        k: usize,
    ) -> candle_core::Result<CudaStorage> {
        let per_unit = 16 / std::mem::size_of::<T>();
        let start = l.start_offset();
        let (pixels, row) = (grid_pixels(s, op)?, k * k * s.c);
        if !s.c.is_multiple_of(per_unit) || !start.is_multiple_of(per_unit) {
            return crate::cuda::new_output(
                op,
                "im2col_nhwc",
                &[(x, l)],
                pixels * row,
                &image_scalars(s, k),
                crate::launch::per_pixel(pixels, row),
            );
        }
        let dev = x.device();
        let input = crate::cuda::input::<T>(op, x, l)?;
        let columns = crate::cuda::output::<T>(dev, pixels * row)?;
        let units = s.with_channels(s.c / per_unit);
        let [h, w, c, k_] = [units.h, units.w, units.c, k].map(|v| v as i32);
        let geometry = crate::launch::per_pixel(pixels, k * k * units.c);
        launch!(dev, "im2col_nhwc_x16", geometry, [&input, &columns, &h, &w, &c, &k_])?;
        Ok(storage(columns, dev))
    }
    with_element!(op, x.dtype(), in_units(op, x, l, s, k))
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = nhwc_of(l, self.name())?;
        let out = dispatch_float!(self.name(), st, |v| into_storage(im2col_values(
            contiguous(v, l, self.name())?,
            s,
            self.k
        )));
        Ok((out, Shape::from((s.pixels(), self.k * self.k * s.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = nhwc_of(l, self.name())?;
        let out = columns_on_gpu(self.name(), st, l, s, self.k)?;
        Ok((out, Shape::from((s.pixels(), self.k * self.k * s.c))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let col2im = Col2im { input: nhwc_of(x.layout(), self.name())?, k: self.k };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&col2im)?))
    }
}

/// Column gradients -> the input gradient of an [`Im2col`] whose input was `input`.
struct Col2im {
    input: Nhwc,
    k: usize,
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.input;
        let out = dispatch_float!(self.name(), st, |v| into_storage(col2im_values(
            contiguous(v, l, self.name())?,
            s,
            self.k
        )));
        Ok((out, Shape::from((s.b, s.h, s.w, s.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = self.input;
        let geometry = crate::launch::per_pixel(grid_pixels(s, self.name())?, s.c);
        let out = crate::cuda::new_output(
            self.name(),
            "col2im_nhwc",
            &[(st, l)],
            s.len(),
            &image_scalars(s, self.k),
            geometry,
        )?;
        Ok((out, Shape::from((s.b, s.h, s.w, s.c))))
    }
}

/// The CPU convolution as one autograd node over the engine's tiled im2col GEMMs (a few MB of
/// columns at a time, never the k*k-times-the-input matrix): the forward, the weight and bias
/// gradients, and the input gradient as the convolution of dy with the flipped kernel, every
/// GEMM's inputs at `gemm`.
struct ConvSame {
    gemm: Precision,
}

/// [C_out, C_in, k, k] of a weight's layout.
fn kernel_dims(layout: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize)> {
    match layout.dims() {
        &[c_out, c_in, k, k2] if k == k2 => Ok((c_out, c_in, k)),
        d => bail!("{op}: expected a [C_out, C_in, k, k] kernel, got shape {d:?}"),
    }
}

fn conv_cpu<T: Real>(
    gemm: Precision,
    x: &[T],
    s: Nhwc,
    weight: &[T],
    bias: &[T],
    (c_out, k): (usize, usize),
) -> Vec<T> {
    let mut packed = vec![T::ZERO; k * k * s.c * c_out];
    kernels::pack(weight, c_out, s.c, k, &mut packed);
    let mut y = vec![T::ZERO; s.pixels() * c_out];
    kernels::forward(gemm, x, s, false, k, &packed, bias, &mut y, &mut Vec::new());
    y
}

/// d loss / d x: dy convolved with the flipped kernel.
fn conv_cpu_input_grad<T: Real>(
    gemm: Precision,
    dy: &[T],
    s: Nhwc,
    weight: &[T],
    (c_out, k): (usize, usize),
) -> Vec<T> {
    let flipped = if k == 1 {
        weight.to_vec()
    } else {
        let mut f = vec![T::ZERO; weight.len()];
        kernels::flip(weight, c_out, s.c, k, &mut f);
        f
    };
    let mut dx = vec![T::ZERO; s.len()];
    kernels::backward_input(gemm, &[], s, false, k, &flipped, c_out, dy, &mut dx, &mut Vec::new());
    dx
}

/// The weight gradient [C_out, C_in, k, k] followed by the bias gradient [C_out].
fn conv_cpu_param_grads<T: Real>(gemm: Precision, x: &[T], s: Nhwc, dy: &[T], (c_out, k): (usize, usize)) -> Vec<T> {
    let mut packed = vec![T::ZERO; c_out * k * k * s.c];
    let mut dbias = vec![T::ZERO; c_out];
    kernels::backward_params_f32_activations(
        gemm,
        x,
        s,
        k,
        dy,
        &mut packed,
        &mut dbias,
        &mut Vec::new(),
        &mut Vec::new(),
    );
    let mut grads = vec![T::ZERO; c_out * s.c * k * k];
    kernels::unpack_add(&packed, s.c, k, &mut grads);
    grads.extend_from_slice(&dbias);
    grads
}

fn nhwc_of(layout: &Layout, op: &str) -> candle_core::Result<Nhwc> {
    let (b, h, w, c) = nhwc(layout, op)?;
    Ok(Nhwc { b, h, w, c })
}

impl CustomOp3 for ConvSame {
    fn name(&self) -> &'static str {
        "conv2d-same"
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
        let s = nhwc_of(l1, self.name())?;
        let (c_out, _, k) = kernel_dims(l2, self.name())?;
        let out = dispatch_float!(self.name(), s1, |x| into_storage(conv_cpu(
            self.gemm,
            contiguous(x, l1, self.name())?,
            s,
            same_dtype_slices(self.name(), s2, l2)?,
            same_dtype_slices(self.name(), s3, l3)?,
            (c_out, k)
        )));
        Ok((out, Shape::from((s.b, s.h, s.w, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let input = nhwc_of(x.layout(), "conv2d-same")?;
        let dx = grad.apply_op2_no_bwd(weight, &ConvInputGrad { input, gemm: self.gemm })?;
        let grads = x.apply_op2_no_bwd(&grad, &ConvParamGrads { k: weight.dim(2)?, gemm: self.gemm })?;
        let n = weight.elem_count();
        let dweight = grads.narrow(0, 0, n)?.reshape(weight.shape())?;
        let dbias = grads.narrow(0, n, grads.dim(0)? - n)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// (dy, weight) -> d loss / d x of a [`ConvSame`] whose input was `input`.
struct ConvInputGrad {
    input: Nhwc,
    gemm: Precision,
}

impl candle_core::CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-same-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c_out, _, k) = kernel_dims(l2, self.name())?;
        let s = self.input;
        let out = dispatch_float!(self.name(), s1, |dy| into_storage(conv_cpu_input_grad(
            self.gemm,
            contiguous(dy, l1, self.name())?,
            s,
            same_dtype_slices(self.name(), s2, l2)?,
            (c_out, k)
        )));
        Ok((out, Shape::from((s.b, s.h, s.w, s.c))))
    }
}

/// (x, dy) -> the weight and bias gradients of a k x k [`ConvSame`], flat.
struct ConvParamGrads {
    k: usize,
    gemm: Precision,
}

impl candle_core::CustomOp2 for ConvParamGrads {
    fn name(&self) -> &'static str {
        "conv2d-same-param-grads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = nhwc_of(l1, self.name())?;
        let c_out = nhwc(l2, self.name())?.3;
        let out = dispatch_float!(self.name(), s1, |x| into_storage(conv_cpu_param_grads(
            self.gemm,
            contiguous(x, l1, self.name())?,
            s,
            same_dtype_slices(self.name(), s2, l2)?,
            (c_out, self.k)
        )));
        Ok((out, Shape::from(c_out * s.c * self.k * self.k + c_out)))
    }
}

/// 2x2 max-pooling, stride 2, NHWC. The gradient goes to the first maximum of each window.
struct MaxPool2;

fn max_pool2_fwd<T: Real>(x: &[T], s: Nhwc) -> Vec<T> {
    let mut y = vec![T::ZERO; s.len() / 4];
    kernels::max_pool2(x, s, &mut y);
    y
}

fn max_pool2_bwd<T: Real>(x: &[T], y: &[T], g: &[T], s: Nhwc) -> Vec<T> {
    let mut dx = vec![T::ZERO; s.len()];
    kernels::max_pool2_backward(x, s, y, g, &mut dx);
    dx
}

/// The dimensions of a max-pooling input: NHWC with an even height and width.
fn pooled_input(l: &Layout) -> candle_core::Result<Nhwc> {
    let s = nhwc_of(l, "max-pool-2x2")?;
    if s.h % 2 != 0 || s.w % 2 != 0 {
        bail!("max-pool-2x2: height and width must be even, got {}x{}", s.h, s.w);
    }
    Ok(s)
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = pooled_input(l)?;
        let out = dispatch_float!(self.name(), st, |v| into_storage(max_pool2_fwd(contiguous(v, l, self.name())?, s)));
        Ok((out, Shape::from((s.b, s.h / 2, s.w / 2, s.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = pooled_input(l)?;
        let out = pooling_kernel(self.name(), "max_pool2_nhwc_fwd", &[(st, l)], s.len() / 4, s)?;
        Ok((out, Shape::from((s.b, s.h / 2, s.w / 2, s.c))))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(y, &grad.contiguous()?, &MaxPool2Backward)?))
    }
}

struct MaxPool2Backward;

impl CustomOp3 for MaxPool2Backward {
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
        let dims = nhwc_of(l1, self.name())?;
        let out = dispatch_float!(self.name(), s1, |x| into_storage(max_pool2_bwd(
            contiguous(x, l1, self.name())?,
            same_dtype_slices(self.name(), s2, l2)?,
            same_dtype_slices(self.name(), s3, l3)?,
            dims
        )));
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
        let s = nhwc_of(l1, self.name())?;
        // One thread per window (the output's elements) writes all four of its gradients.
        let out = crate::cuda::new_output(
            self.name(),
            "max_pool2_nhwc_bwd",
            &[(s1, l1), (s2, l2), (s3, l3)],
            s.len(),
            &pooling_scalars(s.len() / 4, s),
            crate::launch::elementwise(s.len() / 4),
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// (n, h, w, c): the element count a pooling or upsampling kernel walks and its input's
/// dimensions.
#[cfg(feature = "cuda")]
fn pooling_scalars(n: usize, s: Nhwc) -> [Scalar; 4] {
    [Scalar::U64(n as u64), Scalar::I32(s.h as i32), Scalar::I32(s.w as i32), Scalar::I32(s.c as i32)]
}

/// Kernel `base` over the n elements of its output (input dimensions `s`).
#[cfg(feature = "cuda")]
fn pooling_kernel(
    op: &str,
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    n: usize,
    s: Nhwc,
) -> candle_core::Result<CudaStorage> {
    crate::cuda::new_output(op, base, inputs, n, &pooling_scalars(n, s), crate::launch::elementwise(n))
}

pub fn max_pool2(x: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = crate::ops::bf16_on_cpu_via_f32(&[x], |t| max_pool2(&t[0]))? {
        return Ok(y);
    }
    x.contiguous()?.apply_op1(MaxPool2)
}

/// 2x nearest-neighbour upsampling, NHWC. Backward sums each 2x2 block.
struct Upsample2;

fn upsample2_fwd<T: Real>(x: &[T], s: Nhwc) -> Vec<T> {
    let mut y = vec![T::ZERO; 4 * s.len()];
    kernels::upsample2(x, s, &mut y);
    y
}

fn upsample2_bwd<T: Real>(g: &[T], s: Nhwc) -> Vec<T> {
    let mut dx = vec![T::ZERO; s.len()];
    kernels::upsample2_backward(g, s, &mut dx);
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
            Nhwc { b, h, w, c }
        )));
        Ok((out, Shape::from((b, 2 * h, 2 * w, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = nhwc_of(l, self.name())?;
        let out = pooling_kernel(self.name(), "upsample2_nhwc_fwd", &[(st, l)], 4 * s.len(), s)?;
        Ok((out, Shape::from((s.b, 2 * s.h, 2 * s.w, s.c))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Upsample2Backward { input: nhwc_of(x.layout(), "upsample")? })?))
    }
}

struct Upsample2Backward {
    input: Nhwc,
}

impl CustomOp1 for Upsample2Backward {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Nhwc { b, h, w, c } = self.input;
        let out = dispatch_float!(self.name(), s, |v| into_storage(upsample2_bwd(
            contiguous(v, l, self.name())?,
            self.input
        )));
        Ok((out, Shape::from((b, h, w, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = self.input;
        let out = pooling_kernel(self.name(), "upsample2_nhwc_bwd", &[(st, l)], s.len(), s)?;
        Ok((out, Shape::from((s.b, s.h, s.w, s.c))))
    }
}

pub fn upsample2(x: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = crate::ops::bf16_on_cpu_via_f32(&[x], |t| upsample2(&t[0]))? {
        return Ok(y);
    }
    x.contiguous()?.apply_op1(Upsample2)
}
