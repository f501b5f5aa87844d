//! Convolution pieces for the dVAE and the segmentation head on candle's autograd, in NHWC
//! layout: a "same" convolution, 2x2 max-pooling and 2x nearest upsampling, each a custom op
//! with a backward pass. On the CPU the convolution runs the engine's tiled im2col (or, for 3x3
//! kernels, Winograd) GEMMs both ways (candle's own CPU conv backward is a direct loop, far too
//! slow for training). On a GPU they are candle's own ops in NCHW, which have CUDA kernels and
//! backward passes.

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::engine::conv::{self as kernels, Nhwc};
use crate::engine::simd::Real;
use crate::ops::{contiguous, dispatch_float, into_storage, same_dtype_slices};

fn nhwc(layout: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    match layout.dims() {
        &[b, h, w, c] => Ok((b, h, w, c)),
        d => bail!("{op}: expected an NHWC tensor, got shape {d:?}"),
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
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, ConvSame)
}

/// The CPU convolution as one autograd node over the engine's tiled im2col GEMMs (a few MB of
/// columns at a time, never the k*k-times-the-input matrix): the forward, the weight and bias
/// gradients, and the input gradient as the convolution of dy with the flipped kernel.
struct ConvSame;

/// [C_out, C_in, k, k] of a weight's layout.
fn kernel_dims(layout: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize)> {
    match layout.dims() {
        &[c_out, c_in, k, k2] if k == k2 => Ok((c_out, c_in, k)),
        d => bail!("{op}: expected a [C_out, C_in, k, k] kernel, got shape {d:?}"),
    }
}

fn conv_cpu<T: Real>(x: &[T], s: Nhwc, weight: &[T], bias: &[T], (c_out, k): (usize, usize)) -> Vec<T> {
    let mut packed = vec![T::ZERO; k * k * s.c * c_out];
    kernels::pack(weight, c_out, s.c, k, &mut packed);
    let mut y = vec![T::ZERO; s.pixels() * c_out];
    kernels::forward(x, s, false, k, &packed, bias, &mut y, &mut Vec::new());
    y
}

/// d loss / d x: dy convolved with the flipped kernel.
fn conv_cpu_input_grad<T: Real>(dy: &[T], s: Nhwc, weight: &[T], (c_out, k): (usize, usize)) -> Vec<T> {
    let flipped = if k == 1 {
        weight.to_vec()
    } else {
        let mut f = vec![T::ZERO; weight.len()];
        kernels::flip(weight, c_out, s.c, k, &mut f);
        f
    };
    let mut dx = vec![T::ZERO; s.len()];
    kernels::backward_input(&[], s, false, k, &flipped, c_out, dy, &mut dx, &mut Vec::new());
    dx
}

/// The weight gradient [C_out, C_in, k, k] followed by the bias gradient [C_out].
fn conv_cpu_param_grads<T: Real>(x: &[T], s: Nhwc, dy: &[T], (c_out, k): (usize, usize)) -> Vec<T> {
    let mut packed = vec![T::ZERO; c_out * k * k * s.c];
    let mut dbias = vec![T::ZERO; c_out];
    kernels::backward_params(x, s, false, k, dy, &mut packed, &mut dbias, &mut Vec::new(), &mut Vec::new());
    let mut grads = vec![T::ZERO; c_out * s.c * k * k];
    kernels::unpack_add(&packed, s.c, k, &mut grads);
    grads.extend_from_slice(&dbias);
    grads
}

fn nhwc_of(layout: &Layout, op: &str) -> candle_core::Result<Nhwc> {
    let (b, h, w, c) = nhwc(layout, op)?;
    Ok(Nhwc { b, h, w, c })
}

impl candle_core::CustomOp3 for ConvSame {
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
        let dx = grad.apply_op2_no_bwd(weight, &ConvInputGrad { input: nhwc_of(x.layout(), "conv2d-same")? })?;
        let grads = x.apply_op2_no_bwd(&grad, &ConvParamGrads { k: weight.dim(2)? })?;
        let n = weight.elem_count();
        let dweight = grads.narrow(0, 0, n)?.reshape(weight.shape())?;
        let dbias = grads.narrow(0, n, grads.dim(0)? - n)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// (dy, weight) -> d loss / d x of a [`ConvSame`] whose input was `input`.
struct ConvInputGrad {
    input: Nhwc,
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
            Nhwc { b, h, w, c }
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
        let dims = nhwc_of(l1, self.name())?;
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
