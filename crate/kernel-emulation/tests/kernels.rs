//! Each CUDA kernel, run on the host by the emulator with the GPU build's launch geometry,
//! against beit-core's CPU ops (or, for the optimizer and EMA updates, their definitions).
//! bf16 kernels read bf16 and compute in f32: they are held to the f32 CPU op on the same
//! (bf16) values, rounded to bf16 where the kernel writes bf16.

use beit_core::launch::{elementwise, per_column, per_pixel, per_row, ROWS_PER_CHUNK};
use beit_core::{conv, ops};
use beit_kernel_emulation::Launch;
use candle_core::{DType, Device, Tensor, Var};
use half::bf16;

/// Reproducible values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The kernels' two element types, and how the CPU reference sees their values.
trait Element: Copy + 'static {
    const SUFFIX: &'static str;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Relative tolerance of an output of this type (see `assert_close`).
    const TOLERANCE: f32;
}

impl Element for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    const TOLERANCE: f32 = 2e-5;
}

impl Element for bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    // One bf16 rounding step (2^-8 relative): f32 sums in another order can round the other way.
    const TOLERANCE: f32 = 8e-3;
}

/// Values of type T and the same values as f32.
fn typed<T: Element>(v: &[f32]) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    let f = t.iter().map(|x| x.to_f32()).collect();
    (t, f)
}

fn name<T: Element>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// |kernel - reference| <= tolerance * (|reference| + 1% of the largest |reference|): relative,
/// except near zero, where values that cancel carry their terms' rounding.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let floor = want.iter().fold(1e-6f32, |m, w| m.max(0.01 * w.abs()));
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / (w.abs() + floor);
        assert!(g.is_finite(), "{what}[{i}] = {g}");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= tolerance,
        "{what}[{i}]: kernel {} vs CPU {} (relative error {:e} > {tolerance:e})",
        got[i],
        want[i],
        worst.0
    );
}

#[track_caller]
fn assert_close_t<T: Element>(what: &str, got: &[T], want: &[f32]) {
    let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
    assert_close(what, &got, want, T::TOLERANCE);
}

// ---- LayerNorm ----------------------------------------------------------------------------

const EPS: f32 = 1e-6;

fn layer_norm_forward<T: Element>(rows: usize, d: usize) {
    let (mut x, xf) = typed::<T>(&values(rows * d, 1, 3.0));
    let (mut gamma, gf) = typed::<T>(&values(d, 2, 1.5));
    let (mut beta, bf) = typed::<T>(&values(d, 3, 0.5));
    let mut y = vec![T::from_f32(f32::NAN); rows * d];
    Launch::new()
        .buffer(&mut x)
        .buffer(&mut gamma)
        .buffer(&mut beta)
        .buffer(&mut y)
        .scalar(d as i32)
        .scalar(EPS)
        .run(&name::<T>("layer_norm_fwd"), per_row(rows, d))
        .unwrap();
    let want = ops::layer_norm(&tensor(&xf, &[rows, d]), &tensor(&gf, &[d]), &tensor(&bf, &[d]), EPS as f64).unwrap();
    assert_close_t(&format!("layer_norm_fwd {rows}x{d}"), &y, &f32s(&want));
}

#[test]
fn layer_norm_forward_agrees_with_the_cpu() {
    for (rows, d) in [(3, 7), (4, 33), (2, 768), (1, 1500)] {
        layer_norm_forward::<f32>(rows, d);
        layer_norm_forward::<bf16>(rows, d);
    }
}

/// dx, dgamma and dbeta of sum(g * layer_norm(x)), from the two backward kernels as the CUDA
/// op runs them (dx rows, then the parameter rows of the packed f32 output).
fn layer_norm_backward<T: Element>(rows: usize, d: usize) {
    let (mut x, xf) = typed::<T>(&values(rows * d, 4, 2.0));
    let (mut gamma, gf) = typed::<T>(&values(d, 5, 1.5));
    let (mut g, gradf) = typed::<T>(&values(rows * d, 6, 1.0));
    let mut packed = vec![f32::NAN; rows * d];
    packed.extend(vec![0.0f32; 2 * d]);
    let mut stats = vec![f32::NAN; 2 * rows];
    Launch::new()
        .buffer(&mut x)
        .buffer(&mut gamma)
        .buffer(&mut g)
        .buffer(&mut packed)
        .buffer(&mut stats)
        .scalar(d as i32)
        .scalar(EPS)
        .run(&name::<T>("layer_norm_bwd_rows"), per_row(rows, d))
        .unwrap();
    Launch::new()
        .buffer(&mut x)
        .buffer(&mut g)
        .buffer(&mut stats)
        .buffer(&mut packed)
        .scalar(rows as i32)
        .scalar(d as i32)
        .scalar(ROWS_PER_CHUNK as i32)
        .run(&name::<T>("layer_norm_bwd_params"), per_column(rows, d))
        .unwrap();

    let xv = Var::from_tensor(&tensor(&xf, &[rows, d])).unwrap();
    let gv = Var::from_tensor(&tensor(&gf, &[d])).unwrap();
    let bv = Var::from_tensor(&tensor(&values(d, 7, 0.5), &[d])).unwrap();
    let y = ops::layer_norm(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), EPS as f64).unwrap();
    let grads = (y * tensor(&gradf, &[rows, d])).unwrap().sum_all().unwrap().backward().unwrap();
    let what = format!("layer_norm backward {rows}x{d}");
    // All three are f32 outputs computed in f32 from the same values, whatever T.
    let tolerance = 2e-4;
    assert_close(&format!("{what} dx"), &packed[..rows * d], &f32s(grads.get(&xv).unwrap()), tolerance);
    assert_close(
        &format!("{what} dgamma"),
        &packed[rows * d..(rows + 1) * d],
        &f32s(grads.get(&gv).unwrap()),
        tolerance,
    );
    assert_close(&format!("{what} dbeta"), &packed[(rows + 1) * d..], &f32s(grads.get(&bv).unwrap()), tolerance);
}

#[test]
fn layer_norm_backward_agrees_with_the_cpu() {
    // 130 rows: three row chunks add into the parameter gradients; 300 columns: two blocks.
    for (rows, d) in [(5, 7), (130, 40), (70, 300)] {
        layer_norm_backward::<f32>(rows, d);
        layer_norm_backward::<bf16>(rows, d);
    }
}

// ---- Attention softmax --------------------------------------------------------------------

/// softmax(scale * x + bias) over rows of d, x [batch, heads, d, d], bias [heads, d, d].
fn softmax_forward<T: Element>(batch: usize, heads: usize, d: usize, with_bias: bool) {
    let n = batch * heads * d * d;
    let scale = 0.125f32;
    let (mut x, xf) = typed::<T>(&values(n, 8, 20.0));
    let (mut bias, biasf) = typed::<T>(&values(heads * d * d, 9, 2.0));
    let bias_rows = if with_bias { heads * d } else { 0 };
    let mut y = vec![T::from_f32(f32::NAN); n];
    // Without a bias the CUDA op passes x again; the kernel must not read it.
    let mut x_again = typed::<T>(&xf).0;
    let launch = Launch::new().buffer(&mut x);
    let launch = if with_bias { launch.buffer(&mut bias) } else { launch.buffer(&mut x_again) };
    launch
        .buffer(&mut y)
        .scalar(d as i32)
        .scalar(bias_rows as i32)
        .scalar(scale)
        .run(&name::<T>("softmax_fwd"), per_row(n / d, d))
        .unwrap();
    let x_t = tensor(&xf, &[batch, heads, d, d]);
    let bias_t = tensor(&biasf, &[heads, d, d]);
    let want = ops::scaled_softmax(&x_t, with_bias.then_some(&bias_t), scale as f64).unwrap();
    assert_close_t(&format!("softmax_fwd {batch}x{heads}x{d}x{d} bias {with_bias}"), &y, &f32s(&want));
}

#[test]
fn softmax_forward_agrees_with_the_cpu() {
    for (batch, heads, d) in [(2, 3, 5), (2, 2, 50), (1, 2, 197)] {
        for with_bias in [false, true] {
            softmax_forward::<f32>(batch, heads, d, with_bias);
            softmax_forward::<bf16>(batch, heads, d, with_bias);
        }
    }
}

fn softmax_backward<T: Element>(rows: usize, d: usize) {
    let xf = values(rows * d, 10, 4.0);
    let xv = Var::from_tensor(&tensor(&xf, &[rows, d])).unwrap();
    let y_t = ops::softmax_last_dim(xv.as_tensor()).unwrap();
    let (mut y, yf) = typed::<T>(&f32s(&y_t));
    let (mut g, gf) = typed::<T>(&values(rows * d, 11, 1.0));
    let mut dx = vec![T::from_f32(f32::NAN); rows * d];
    Launch::new()
        .buffer(&mut y)
        .buffer(&mut g)
        .buffer(&mut dx)
        .scalar(d as i32)
        .run(&name::<T>("softmax_bwd"), per_row(rows, d))
        .unwrap();
    // dx = y * (g - sum(g * y)), from the (rounded) y the kernel read.
    let y_rounded = tensor(&yf, &[rows, d]);
    let g_t = tensor(&gf, &[rows, d]);
    let dot = (&y_rounded * &g_t).unwrap().sum_keepdim(1).unwrap();
    let want = (&y_rounded * g_t.broadcast_sub(&dot).unwrap()).unwrap();
    assert_close_t(&format!("softmax_bwd {rows}x{d}"), &dx, &f32s(&want));
    if T::SUFFIX == "f32" {
        // and the same as the CPU op's own backward
        let grads = (y_t * tensor(&gf, &[rows, d])).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close_t("softmax_bwd vs autograd", &dx, &f32s(grads.get(&xv).unwrap()));
    }
}

#[test]
fn softmax_backward_agrees_with_the_cpu() {
    for (rows, d) in [(4, 5), (6, 197), (2, 1100)] {
        softmax_backward::<f32>(rows, d);
        softmax_backward::<bf16>(rows, d);
    }
}

// ---- GELU and bias ------------------------------------------------------------------------

fn gelu<T: Element>(n: usize) {
    let (mut x, xf) = typed::<T>(&values(n, 12, 5.0));
    let (mut g, gf) = typed::<T>(&values(n, 13, 1.0));
    let mut y = vec![T::from_f32(f32::NAN); n];
    let mut dx = vec![T::from_f32(f32::NAN); n];
    Launch::new().buffer(&mut x).buffer(&mut y).scalar(n as u64).run(&name::<T>("gelu_fwd"), elementwise(n)).unwrap();
    Launch::new()
        .buffer(&mut x)
        .buffer(&mut g)
        .buffer(&mut dx)
        .scalar(n as u64)
        .run(&name::<T>("gelu_bwd"), elementwise(n))
        .unwrap();
    let xv = Var::from_tensor(&tensor(&xf, &[n])).unwrap();
    let want = ops::gelu_erf(xv.as_tensor()).unwrap();
    assert_close_t(&format!("gelu_fwd {n}"), &y, &f32s(&want));
    let grads = (want * tensor(&gf, &[n])).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close_t(&format!("gelu_bwd {n}"), &dx, &f32s(grads.get(&xv).unwrap()));
}

#[test]
fn gelu_agrees_with_the_cpu() {
    // 3000 elements: 12 blocks, the last one partly idle.
    for n in [1, 100, 3000] {
        gelu::<f32>(n);
        gelu::<bf16>(n);
    }
}

fn bias_add_scale_and_row_sums<T: Element>(rows: usize, n: usize) {
    let (mut x, xf) = typed::<T>(&values(rows * n, 14, 3.0));
    let (mut b, bf) = typed::<T>(&values(n, 15, 1.0));
    let mut y = vec![T::from_f32(f32::NAN); rows * n];
    Launch::new()
        .buffer(&mut x)
        .buffer(&mut b)
        .buffer(&mut y)
        .scalar((rows * n) as u64)
        .scalar(n as i32)
        .run(&name::<T>("add_bias"), elementwise(rows * n))
        .unwrap();
    let x_t = tensor(&xf, &[rows, n]);
    let want = ops::add_bias(&x_t, &tensor(&bf, &[n])).unwrap();
    assert_close_t(&format!("add_bias {rows}x{n}"), &y, &f32s(&want));

    let mut scaled = vec![T::from_f32(f32::NAN); rows * n];
    Launch::new()
        .buffer(&mut x)
        .buffer(&mut b)
        .buffer(&mut scaled)
        .scalar((rows * n) as u64)
        .scalar(n as i32)
        .run(&name::<T>("scale_columns"), elementwise(rows * n))
        .unwrap();
    let want = ops::scale_columns(&x_t, &tensor(&bf, &[n])).unwrap();
    assert_close_t(&format!("scale_columns {rows}x{n}"), &scaled, &f32s(&want));

    let mut sums = vec![0.0f32; n];
    Launch::new()
        .buffer(&mut x)
        .buffer(&mut sums)
        .scalar(rows as i32)
        .scalar(n as i32)
        .scalar(ROWS_PER_CHUNK as i32)
        .run(&name::<T>("sum_rows"), per_column(rows, n))
        .unwrap();
    assert_close(&format!("sum_rows {rows}x{n}"), &sums, &f32s(&ops::sum_rows(&x_t).unwrap()), 1e-4);
}

#[test]
fn bias_add_column_scale_and_row_sums_agree_with_the_cpu() {
    for (rows, n) in [(1, 3), (5, 40), (150, 300)] {
        bias_add_scale_and_row_sums::<f32>(rows, n);
        bias_add_scale_and_row_sums::<bf16>(rows, n);
    }
}

// ---- Cross-entropy over the vocabulary ----------------------------------------------------

#[test]
fn cross_entropy_agrees_with_the_cpu() {
    for (rows, vocab) in [(3, 10), (4, 8192)] {
        let mut z = values(rows * vocab, 16, 8.0);
        let mut targets: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 3) % vocab) as u32).collect();
        let mut g = values(rows, 17, 1.0);
        let mut loss = vec![f32::NAN; rows];
        let mut dz = vec![f32::NAN; rows * vocab];
        let zf = z.clone();
        let gf = g.clone();
        let targets_t = Tensor::from_slice(&targets, rows, &Device::Cpu).unwrap();
        Launch::new()
            .buffer(&mut z)
            .buffer(&mut targets)
            .buffer(&mut loss)
            .scalar(vocab as i32)
            .run("cross_entropy_fwd", per_row(rows, vocab))
            .unwrap();
        Launch::new()
            .buffer(&mut z)
            .buffer(&mut targets)
            .buffer(&mut g)
            .buffer(&mut dz)
            .scalar(vocab as i32)
            .run("cross_entropy_bwd", per_row(rows, vocab))
            .unwrap();
        let zv = Var::from_tensor(&tensor(&zf, &[rows, vocab])).unwrap();
        let want = ops::cross_entropy_rows(zv.as_tensor(), &targets_t).unwrap();
        assert_close(&format!("cross_entropy_fwd {rows}x{vocab}"), &loss, &f32s(&want), 2e-5);
        let grads = (want * tensor(&gf, &[rows])).unwrap().sum_all().unwrap().backward().unwrap();
        let want_dz = f32s(grads.get(&zv).unwrap());
        // Most softmax entries are tiny: judge them against the row's largest gradient.
        for r in 0..rows {
            let row = r * vocab..(r + 1) * vocab;
            let top = want_dz[row.clone()].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for i in row {
                assert!(
                    (dz[i] - want_dz[i]).abs() <= 2e-5 * top,
                    "cross_entropy_bwd[{i}]: {} vs {}",
                    dz[i],
                    want_dz[i]
                );
            }
        }
    }
}

// ---- Cross-entropy of logits resized to the labels' size ----------------------------------

#[test]
fn resized_cross_entropy_agrees_with_the_cpu() {
    // Up by non-integer factors with a partial warp of classes; down with several warps.
    for (b, low, high, k) in [(2, (4, 3), (9, 7), 37), (1, (6, 5), (5, 3), 300)] {
        let (pixels, ignore) = (b * high.0 * high.1, 255u32);
        let mut z = values(b * low.0 * low.1 * k, 22, 6.0);
        let mut labels: Vec<u32> = (0..pixels).map(|i| if i % 4 == 3 { ignore } else { (i * 31 % k) as u32 }).collect();
        let mut g = values(pixels, 23, 1.0);
        let (mut taps, mut weights) = (Vec::new(), Vec::new());
        for (n_in, n_out) in [(low.0, high.0), (low.1, high.1)] {
            for pair in ops::interpolation_taps(n_in, n_out, false) {
                taps.extend(pair.iter().map(|&(i, _)| i as u32));
                weights.extend(pair.iter().map(|&(_, w)| w as f32));
            }
        }
        let (zf, gf, labels_t) =
            (z.clone(), g.clone(), Tensor::from_slice(&labels, (b, high.0, high.1), &Device::Cpu).unwrap());
        let mut loss = vec![f32::NAN; pixels];
        let mut dz = vec![0f32; z.len()];
        let sizes = [low.0, low.1, high.0, high.1, k].map(|n| n as i32);
        let fwd =
            Launch::new().buffer(&mut z).buffer(&mut labels).buffer(&mut taps).buffer(&mut weights).buffer(&mut loss);
        sizes
            .iter()
            .fold(fwd, |l, &n| l.scalar(n))
            .scalar(ignore)
            .run("resized_cross_entropy_fwd", per_row(pixels, k))
            .unwrap();
        let bwd = Launch::new()
            .buffer(&mut z)
            .buffer(&mut labels)
            .buffer(&mut taps)
            .buffer(&mut weights)
            .buffer(&mut g)
            .buffer(&mut dz);
        sizes
            .iter()
            .fold(bwd, |l, &n| l.scalar(n))
            .scalar(ignore)
            .run("resized_cross_entropy_bwd", per_row(pixels, k))
            .unwrap();
        let zv = Var::from_tensor(&tensor(&zf, &[b, low.0, low.1, k])).unwrap();
        let want = ops::resized_cross_entropy(zv.as_tensor(), &labels_t, ignore).unwrap();
        let what = format!("{low:?} -> {high:?}, {k} classes");
        assert_close(&format!("resized_cross_entropy_fwd {what}"), &loss, &f32s(&want), 2e-5);
        let grads = (want * tensor(&gf, &[b, high.0, high.1])).unwrap().sum_all().unwrap().backward().unwrap();
        let want_dz = f32s(grads.get(&zv).unwrap());
        let top = want_dz.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (got, want)) in dz.iter().zip(&want_dz).enumerate() {
            assert!((got - want).abs() <= 2e-5 * top, "resized_cross_entropy_bwd {what} [{i}]: {got} vs {want}");
        }
        // Class ids, and ties (every class equal) to the first.
        for (logits, name) in [(zf.clone(), "random"), (vec![0.5f32; zf.len()], "tied")] {
            let mut z = logits.clone();
            let mut classes = vec![u32::MAX; pixels];
            let l = Launch::new().buffer(&mut z).buffer(&mut taps).buffer(&mut weights).buffer(&mut classes);
            sizes.iter().fold(l, |l, &n| l.scalar(n)).run("resized_argmax", per_row(pixels, k)).unwrap();
            let want = ops::resized_argmax(&tensor(&logits, &[b, low.0, low.1, k]), high).unwrap();
            assert_eq!(classes, want.flatten_all().unwrap().to_vec1::<u32>().unwrap(), "resized_argmax {what}, {name}");
        }
    }
}

// ---- AdamW and EMA, in place --------------------------------------------------------------

#[test]
fn adamw_kernels_follow_their_definitions() {
    let n = 1000;
    let (beta1, beta2, grad_scale, lr, weight_decay, eps, step) =
        (0.9f32, 0.999f32, 0.5f32, 1e-3f32, 0.05f32, 1e-8f32, 3);
    let mut g = values(n, 18, 1.0);
    let (m0, v0, p0) =
        (values(n, 19, 0.1), values(n, 20, 0.01).iter().map(|v| v.abs()).collect::<Vec<_>>(), values(n, 21, 1.0));
    let (mut m, mut v, mut p) = (m0.clone(), v0.clone(), p0.clone());
    Launch::new()
        .buffer(&mut m)
        .buffer(&mut g)
        .scalar(n as u64)
        .scalar(beta1)
        .scalar(grad_scale)
        .scalar(0i32)
        .run("adamw_moment", elementwise(n))
        .unwrap();
    Launch::new()
        .buffer(&mut v)
        .buffer(&mut g)
        .scalar(n as u64)
        .scalar(beta2)
        .scalar(grad_scale)
        .scalar(1i32)
        .run("adamw_moment", elementwise(n))
        .unwrap();
    let (bc1, bc2) = (1.0 - beta1.powi(step), 1.0 - beta2.powi(step));
    Launch::new()
        .buffer(&mut p)
        .buffer(&mut m)
        .buffer(&mut v)
        .scalar(n as u64)
        .scalar(lr)
        .scalar(lr * weight_decay)
        .scalar(1.0 / bc1)
        .scalar(1.0 / bc2.sqrt())
        .scalar(eps)
        .run("adamw_update", elementwise(n))
        .unwrap();
    for i in 0..n {
        let gs = (g[i] * grad_scale) as f64;
        let mi = beta1 as f64 * m0[i] as f64 + (1.0 - beta1 as f64) * gs;
        let vi = beta2 as f64 * v0[i] as f64 + (1.0 - beta2 as f64) * gs * gs;
        let update = (mi / bc1 as f64) / ((vi / bc2 as f64).sqrt() + eps as f64);
        let pi = p0[i] as f64 - lr as f64 * (update + weight_decay as f64 * p0[i] as f64);
        assert!((m[i] as f64 - mi).abs() <= 1e-6, "m[{i}]: {} vs {mi}", m[i]);
        assert!((v[i] as f64 - vi).abs() <= 1e-7, "v[{i}]: {} vs {vi}", v[i]);
        assert!((p[i] as f64 - pi).abs() <= 1e-6, "p[{i}]: {} vs {pi}", p[i]);
    }
}

#[test]
fn ema_kernel_follows_its_definition() {
    let n = 700;
    let decay = 0.99f32;
    let e0 = values(n, 22, 1.0);
    let mut p = values(n, 23, 1.0);
    let mut e = e0.clone();
    Launch::new()
        .buffer(&mut e)
        .buffer(&mut p)
        .scalar(n as u64)
        .scalar(decay)
        .run("ema_update", elementwise(n))
        .unwrap();
    for i in 0..n {
        let want = decay as f64 * e0[i] as f64 + (1.0 - decay as f64) * p[i] as f64;
        assert!((e[i] as f64 - want).abs() <= 1e-6, "e[{i}]: {} vs {want}", e[i]);
    }
}

// ---- NHWC convolution pieces --------------------------------------------------------------

/// The kernels' (h, w, c, k) arguments.
fn image<'a>(launch: Launch<'a>, h: usize, w: usize, c: usize, k: usize) -> Launch<'a> {
    launch.scalar(h as i32).scalar(w as i32).scalar(c as i32).scalar(k as i32)
}

fn im2col_and_col2im<T: Element>(b: usize, h: usize, w: usize, c: usize, k: usize) {
    let (pixels, row) = (b * h * w, k * k * c);
    let what = format!("{b}x{h}x{w}x{c}, k {k}");
    let (mut x, xf) = typed::<T>(&values(pixels * c, 30, 2.0));
    let mut columns = vec![T::from_f32(f32::NAN); pixels * row];
    image(Launch::new().buffer(&mut x).buffer(&mut columns), h, w, c, k)
        .run(&name::<T>("im2col_nhwc"), per_pixel(pixels, row))
        .unwrap();
    let xv = Var::from_tensor(&tensor(&xf, &[b, h, w, c])).unwrap();
    let want = conv::im2col(xv.as_tensor(), k).unwrap();
    assert_close_t(&format!("im2col_nhwc {what}"), &columns, &f32s(&want));
    // The same copy in 16-byte units, where a pixel's channels fill whole units.
    let per_unit = 16 / std::mem::size_of::<T>();
    if c.is_multiple_of(per_unit) {
        let mut units = vec![T::from_f32(f32::NAN); pixels * row];
        image(Launch::new().buffer(&mut x).buffer(&mut units), h, w, c / per_unit, k)
            .run("im2col_nhwc_x16", per_pixel(pixels, row / per_unit))
            .unwrap();
        assert_close_t(&format!("im2col_nhwc_x16 {what}"), &units, &f32s(&want));
    }

    let (mut g, gf) = typed::<T>(&values(pixels * row, 31, 1.0));
    let mut dx = vec![T::from_f32(f32::NAN); pixels * c];
    image(Launch::new().buffer(&mut g).buffer(&mut dx), h, w, c, k)
        .run(&name::<T>("col2im_nhwc"), per_pixel(pixels, c))
        .unwrap();
    let grads = (want * tensor(&gf, &[pixels, row])).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close_t(&format!("col2im_nhwc {what}"), &dx, &f32s(grads.get(&xv).unwrap()));
}

#[test]
fn im2col_and_col2im_agree_with_the_cpu() {
    // Borders on every side; a 7x7 kernel wider than the image; channels past one block of
    // threads (300 > 256) and a row that is not a whole number of warps (3x3x5 = 45).
    // 40 and 16 channels also take the 16-byte copy (f32 and bf16; 300 only f32).
    for (b, h, w, c, k) in [(2, 5, 6, 5, 3), (1, 4, 5, 3, 7), (1, 3, 2, 300, 1), (2, 3, 3, 40, 3), (1, 3, 4, 16, 3)] {
        im2col_and_col2im::<f32>(b, h, w, c, k);
        im2col_and_col2im::<bf16>(b, h, w, c, k);
    }
}

/// The n elements a pooling kernel walks, then the input's (h, w, c).
fn pooling<'a>(launch: Launch<'a>, n: usize, h: usize, w: usize, c: usize) -> Launch<'a> {
    launch.scalar(n as u64).scalar(h as i32).scalar(w as i32).scalar(c as i32)
}

fn max_pool_and_upsample<T: Element>(b: usize, h: usize, w: usize, c: usize) {
    let (n, what) = (b * h * w * c, format!("{b}x{h}x{w}x{c}"));
    // Quarter steps in [-1, 1]: windows with tied maxima, whose gradient goes to the first.
    let ties: Vec<f32> = values(n, 32, 1.0).iter().map(|v| (v * 4.0).round() / 4.0).collect();
    let (mut x, xf) = typed::<T>(&ties);
    let mut y = vec![T::from_f32(f32::NAN); n / 4];
    pooling(Launch::new().buffer(&mut x).buffer(&mut y), n / 4, h, w, c)
        .run(&name::<T>("max_pool2_nhwc_fwd"), elementwise(n / 4))
        .unwrap();
    let xv = Var::from_tensor(&tensor(&xf, &[b, h, w, c])).unwrap();
    let want = conv::max_pool2(xv.as_tensor()).unwrap();
    assert_close_t(&format!("max_pool2_nhwc_fwd {what}"), &y, &f32s(&want));
    let (mut g, gf) = typed::<T>(&values(n / 4, 33, 1.0));
    let mut dx = vec![T::from_f32(f32::NAN); n];
    pooling(Launch::new().buffer(&mut x).buffer(&mut y).buffer(&mut g).buffer(&mut dx), n / 4, h, w, c)
        .run(&name::<T>("max_pool2_nhwc_bwd"), elementwise(n / 4))
        .unwrap();
    let grads = (want * tensor(&gf, &[b, h / 2, w / 2, c])).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close_t(&format!("max_pool2_nhwc_bwd {what}"), &dx, &f32s(grads.get(&xv).unwrap()));

    let mut up = vec![T::from_f32(f32::NAN); 4 * n];
    pooling(Launch::new().buffer(&mut x).buffer(&mut up), 4 * n, h, w, c)
        .run(&name::<T>("upsample2_nhwc_fwd"), elementwise(4 * n))
        .unwrap();
    let want = conv::upsample2(xv.as_tensor()).unwrap();
    assert_close_t(&format!("upsample2_nhwc_fwd {what}"), &up, &f32s(&want));
    let (mut g, gf) = typed::<T>(&values(4 * n, 34, 1.0));
    let mut dx = vec![T::from_f32(f32::NAN); n];
    pooling(Launch::new().buffer(&mut g).buffer(&mut dx), n, h, w, c)
        .run(&name::<T>("upsample2_nhwc_bwd"), elementwise(n))
        .unwrap();
    let grads = (want * tensor(&gf, &[b, 2 * h, 2 * w, c])).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close_t(&format!("upsample2_nhwc_bwd {what}"), &dx, &f32s(grads.get(&xv).unwrap()));
}

#[test]
fn max_pool_and_upsample_agree_with_the_cpu() {
    // 300 channels: consecutive threads walk channels, then pixels, then images.
    for (b, h, w, c) in [(2, 4, 6, 3), (1, 2, 2, 300)] {
        max_pool_and_upsample::<f32>(b, h, w, c);
        max_pool_and_upsample::<bf16>(b, h, w, c);
    }
}

// ---- Row lookup (relative position bias) backward -------------------------------------------

fn row_lookup_backward<T: Element>(index: &[u32], rows: usize, n: usize) {
    let picks = index.len();
    let lookup = ops::RowLookup::new(index, rows, &Device::Cpu).unwrap();
    let table = Var::from_tensor(&tensor(&values(rows * n, 40, 1.0), &[rows, n])).unwrap();
    let (mut dy, dyf) = typed::<T>(&values(picks * n, 41, 1.0));
    let y = lookup.forward(table.as_tensor()).unwrap();
    let grads = (y * tensor(&dyf, &[picks, n])).unwrap().sum_all().unwrap().backward().unwrap();
    // The kernel's inputs: each row's picks, as the op lists them.
    let mut offsets = vec![0u32; rows + 1];
    let mut positions: Vec<u32> = Vec::new();
    for r in 0..rows {
        positions.extend((0..picks as u32).filter(|&p| index[p as usize] as usize == r));
        offsets[r + 1] = positions.len() as u32;
    }
    let mut out = vec![f32::NAN; rows * n];
    Launch::new()
        .buffer(&mut dy)
        .buffer(&mut offsets)
        .buffer(&mut positions)
        .buffer(&mut out)
        .scalar((rows * n) as u64)
        .scalar(n as i32)
        .run(&name::<T>("row_lookup_bwd"), elementwise(rows * n))
        .unwrap();
    // f32 sums of the (bf16) gradients: held to the f32 CPU op.
    assert_close(&format!("row_lookup_bwd {rows}x{n}"), &out, &f32s(grads.get(&table).unwrap()), 2e-5);
}

#[test]
fn row_lookup_backward_agrees_with_the_cpu() {
    // The relative position index of a 3x3 grid with [CLS] (28 distances) into a table with two
    // more rows that are never picked; a 300-column table.
    let index = beit_core::arch::backbone::relative_position_index(3, 3);
    row_lookup_backward::<f32>(&index, 30, 12);
    row_lookup_backward::<bf16>(&index, 30, 12);
    row_lookup_backward::<f32>(&[1, 1, 0, 1], 3, 300);
}

// ---- The emulator itself ------------------------------------------------------------------

#[test]
fn launches_with_wrong_arguments_are_refused() {
    let (mut x, mut y, mut b) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 4]);
    let err = Launch::new().buffer(&mut x).buffer(&mut y).run("gelu_fwd_f32", elementwise(4)).unwrap_err();
    assert!(err.contains("takes 3 arguments, got 2"), "{err}");
    // a 64-bit width where the kernel takes int
    let err = Launch::new()
        .buffer(&mut x)
        .buffer(&mut b)
        .buffer(&mut y)
        .scalar(4u64)
        .scalar(4u64)
        .run("add_bias_f32", elementwise(4))
        .unwrap_err();
    assert!(err.contains("argument 4 is 8 bytes, the kernel takes 4"), "{err}");
    let err = Launch::new().run("no_such_kernel", elementwise(4)).unwrap_err();
    assert!(err.contains("no kernel named no_such_kernel"), "{err}");
}
