#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Barrier, Mutex};

use beit_core::arch::classification::ClassifierParams;
use beit_core::arch::dvae::DvaeParams;
use beit_core::arch::mim::MimParams;
use beit_core::config::Precision;
use beit_core::distributed::ReplicaSum;
use beit_core::engine::dvae::DvaeEngine;
use beit_core::engine::heads::classification::ClassifierEngine;
use beit_core::engine::heads::mim::MimEngine;
use beit_core::engine::{Flat, Real};
use beit_core::model::classification::BeitForImageClassification;
use beit_core::model::dvae::Dvae;
use beit_core::model::mim::BeitForMaskedImageModeling;
use beit_core::model::Vars;
use beit_core::params::{ParamTable, Slot, Source};
use beit_core::rng::SplitMix64;
use beit_core::runner::GradientValues;
use beit_core::{BeitConfig, ClassifierConfig, DvaeConfig, MimBatch, SegmenterConfig, SegmenterTrainer};
use candle_core::{DType, Device, Tensor, Var};

/// A model's variables with their checkpoint names, in table order.
pub type NamedVars = Vec<(String, Var)>;

/// A model small enough for finite differences: 2x3 grid of 2x2 patches, 2 layers.
pub fn tiny_config() -> BeitConfig {
    BeitConfig {
        image_size: [4, 6],
        patch_size: 2,
        num_channels: 1,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        vocab_size: 7,
        layer_scale_init_value: 0.1,
        use_absolute_position_embeddings: false,
        use_shared_relative_position_bias: true,
        use_relative_position_bias: false,
        drop_path_rate: 0.0,
        layer_norm_eps: 1e-6,
        initializer_range: 0.02,
    }
}

/// A 16 x 16 model of 4 x 4 patches, width 32: big enough to learn, small enough for 300 steps.
pub fn small_mim_config() -> BeitConfig {
    BeitConfig {
        image_size: [16, 16],
        patch_size: 4,
        hidden_size: 32,
        num_attention_heads: 4,
        intermediate_size: 64,
        vocab_size: 16,
        ..tiny_config()
    }
}

/// A 3-group RGB tokenizer of `size` px (downsampling 4), 32 codes: small enough for every step.
pub fn small_dvae_config(size: usize) -> DvaeConfig {
    DvaeConfig {
        image_size: [size, size],
        num_channels: 3,
        hidden_size: 16,
        num_groups: 3,
        blocks_per_group: 1,
        vocab_size: 32,
        decoder_input_size: 16,
    }
}

/// `len` pixel values in [0, 1]: |N(0, 1)| clipped, from `seed`.
pub fn unit_pixels(len: usize, seed: u64) -> Vec<f32> {
    random_tensor(&[len], seed, DType::F32).to_vec1::<f32>().unwrap().iter().map(|v| v.abs().min(1.0)).collect()
}

pub fn random_tensor(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// A candle model over `table`'s parameters initialised from `seed`, in `dtype`, with its
/// named variables.
pub fn build<M>(
    table: &ParamTable,
    seed: u64,
    dtype: DType,
    new: impl FnOnce(&Vars) -> candle_core::Result<M>,
) -> (M, NamedVars) {
    let vars = Vars::from_source(table, Source::Init(seed), dtype, &Device::Cpu).unwrap();
    let model = new(&vars).unwrap();
    (model, table.params().iter().map(|p| p.name.clone()).zip(vars.vars().iter().cloned()).collect())
}

pub fn mim_model(cfg: &BeitConfig, seed: u64, dtype: DType) -> (BeitForMaskedImageModeling, NamedVars) {
    let (table, p) = MimParams::new(cfg);
    build(&table, seed, dtype, |v| BeitForMaskedImageModeling::new(cfg, &p, v, &Device::Cpu))
}

pub fn classifier_model(cfg: &ClassifierConfig, seed: u64, dtype: DType) -> (BeitForImageClassification, NamedVars) {
    let (table, p) = ClassifierParams::new(cfg);
    build(&table, seed, dtype, |v| BeitForImageClassification::new(cfg, &p, v, &Device::Cpu))
}

pub fn dvae_model(cfg: &DvaeConfig, seed: u64, dtype: DType) -> (Dvae, NamedVars) {
    let (table, p) = DvaeParams::new(cfg);
    build(&table, seed, dtype, |v| Ok(Dvae::new(cfg, &p, v)))
}

/// The current values of `vars` in one flat buffer (table order), as T.
pub fn flat_values<T: Real>(vars: &NamedVars) -> Vec<T> {
    let mut out = Vec::new();
    for (_, v) in vars {
        let values = v.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        out.extend(values.into_iter().map(T::from_f64));
    }
    out
}

/// The engine model over the current values of a candle model's variables.
pub fn mim_engine<T: Real>(cfg: &BeitConfig, vars: &NamedVars) -> MimEngine<T> {
    mim_engine_at(cfg, vars, Precision::F32)
}

/// [`mim_engine`] with its linear layers' GEMMs at `precision`.
pub fn mim_engine_at<T: Real>(cfg: &BeitConfig, vars: &NamedVars, precision: Precision) -> MimEngine<T> {
    let (table, p) = MimParams::new(cfg);
    MimEngine::new(cfg, &p, Flat::new(table, flat_values(vars)).unwrap(), precision).unwrap()
}

pub fn classifier_engine<T: Real>(cfg: &ClassifierConfig, vars: &NamedVars) -> ClassifierEngine<T> {
    classifier_engine_at(cfg, vars, Precision::F32)
}

/// [`classifier_engine`] with its linear layers' GEMMs at `precision`.
pub fn classifier_engine_at<T: Real>(
    cfg: &ClassifierConfig,
    vars: &NamedVars,
    precision: Precision,
) -> ClassifierEngine<T> {
    let (table, p) = ClassifierParams::new(cfg);
    ClassifierEngine::new(cfg, &p, Flat::new(table, flat_values(vars)).unwrap(), precision).unwrap()
}

pub fn dvae_engine<T: Real>(cfg: &DvaeConfig, vars: &NamedVars) -> DvaeEngine<T> {
    dvae_engine_at(cfg, vars, Precision::F32)
}

pub fn dvae_engine_at<T: Real>(cfg: &DvaeConfig, vars: &NamedVars, precision: Precision) -> DvaeEngine<T> {
    let (table, p) = DvaeParams::new(cfg);
    DvaeEngine::new(cfg, &p, table, flat_values(vars), precision).unwrap()
}

/// The slot of parameter `name` in a flat buffer.
pub fn slot<T>(flat: &Flat<T>, name: &str) -> Slot {
    flat.layout.slot(flat.table.find(name).unwrap_or_else(|| panic!("{name} missing from the table")))
}

/// Re-initialises every variable with N(0, scale) values so that zero-initialised tensors
/// (biases, bias tables) are checked at a generic point too.
pub fn randomise(vars: &NamedVars, seed: u64, scale: f64) {
    for (i, (_, v)) in vars.iter().enumerate() {
        let r = random_tensor(v.dims(), seed + i as u64, v.dtype());
        v.set(&(r * scale).unwrap()).unwrap();
    }
}

/// Central finite differences of the scalar `f` with respect to every element of `var`
/// (or `max_coords` evenly spread elements), compared with the analytic gradient.
/// Returns the worst relative error max|a-n| / max(1e-6, max|n|) over the checked elements.
pub fn grad_check(var: &Var, analytic: &Tensor, f: &dyn Fn() -> f64, max_coords: usize) -> f64 {
    // 1e-5: small gradients (query/key weights at init scale) stay above the round-off of f(x+h) - f(x-h).
    let h = 1e-5;
    let base = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let analytic = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let n = base.len();
    let stride = (n / max_coords.max(1)).max(1);
    let mut worst_abs = 0.0f64;
    let mut scale = 1e-6f64;
    for i in (0..n).step_by(stride) {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            f()
        };
        let numeric = (eval(h) - eval(-h)) / (2.0 * h);
        if std::env::var("GRADCHECK_DEBUG").is_ok() {
            eprintln!("coord {i}: numeric {numeric:e} analytic {:e}", analytic[i]);
        }
        worst_abs = worst_abs.max((numeric - analytic[i]).abs());
        scale = scale.max(numeric.abs()).max(analytic[i].abs());
    }
    var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap()).unwrap();
    worst_abs / scale
}

/// A MIM batch of random pixels, a fixed 40% mask pattern and fixed targets.
pub struct Batch {
    pub pixels: Vec<f32>,
    pub mask: Vec<u8>,
    pub targets: Vec<i32>,
}

pub fn batch(cfg: &BeitConfig, b: usize, seed: u64) -> Batch {
    let per = cfg.num_channels * cfg.image_size[0] * cfg.image_size[1];
    let pixels = random_tensor(&[b * per], seed, DType::F32).to_vec1::<f32>().unwrap();
    let n = cfg.num_patches();
    let mask = (0..b * n).map(|i| ((i * 7 + seed as usize) % 5 < 2) as u8).collect();
    let targets = (0..b * n).map(|i| ((i * 13 + 3) % cfg.vocab_size) as i32).collect();
    Batch { pixels, mask, targets }
}

impl Batch {
    pub fn view(&self) -> MimBatch<'_> {
        MimBatch { pixels: &self.pixels, mask: &self.mask, targets: &self.targets }
    }
}

/// Finite-difference tolerance of single ops (f64, tiny shapes).
pub const OP_TOLERANCE: f64 = 1e-6;

/// Checks d(sum(out(inputs) * r))/d(input) for each input against finite differences.
pub fn check_op(shapes: &[&[usize]], op: impl Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Var::from_tensor(&random_tensor(s, 10 + i as u64, DType::F64)).unwrap())
        .collect();
    let tensors = || vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
    let probe = random_tensor(op(&tensors()).dims(), 99, DType::F64);
    let objective = || op(&tensors()).mul(&probe).unwrap().sum_all().unwrap();
    let grads = objective().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v).unwrap_or_else(|| panic!("input {i} got no gradient"));
        let err = grad_check(v, g, &|| objective().to_scalar::<f64>().unwrap(), 64);
        assert!(err < OP_TOLERANCE, "input {i}: relative gradient error {err:e}");
    }
}

/// A segmenter small enough for finite differences: 4x4 grid of 2x2 patches, 4 blocks of
/// width 8, two pool scales, an auxiliary head of 4 channels, 3 classes.
pub fn tiny_segmenter() -> SegmenterConfig {
    let model = BeitConfig {
        image_size: [8, 8],
        num_hidden_layers: 4,
        use_shared_relative_position_bias: false,
        use_relative_position_bias: true,
        ..tiny_config()
    };
    SegmenterConfig {
        out_indices: [1, 2, 3, 4],
        pool_scales: vec![1, 2],
        auxiliary_channels: 4,
        auxiliary_num_convs: 1,
        auxiliary_concat_input: true,
        ..SegmenterConfig::new(model, 3)
    }
}

pub fn toy_config() -> SegmenterConfig {
    SegmenterConfig { num_labels: 2, auxiliary_concat_input: false, ..tiny_segmenter() }
}

/// A learnable toy: the label of a pixel is 1 where the (single-channel) image is positive,
/// 0 elsewhere, with the border ignored.
pub fn toy_batch(cfg: &SegmenterConfig, b: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let [h, w] = cfg.model.image_size;
    let pixels = random_tensor(&[b, 1, h, w], seed, DType::F32).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let labels = pixels
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (y, x) = (i % (h * w) / w, i % w);
            if y == 0 || x == 0 {
                cfg.semantic_loss_ignore_index
            } else {
                u32::from(v > 0.0)
            }
        })
        .collect();
    (pixels, labels)
}

/// Replicas of a data-parallel job as threads of this process: every sum waits for all of
/// them (in f64, so the order they add in does not matter for two f32 values).
pub struct ThreadReplicas {
    barrier: Barrier,
    total: Mutex<Vec<f64>>,
}

impl ThreadReplicas {
    pub fn new(n: usize) -> Self {
        Self { barrier: Barrier::new(n), total: Mutex::new(Vec::new()) }
    }

    fn sum(&self, values: &mut [f64]) {
        // Everyone has read the last sum before it is cleared for this one.
        if self.barrier.wait().is_leader() {
            *self.total.lock().unwrap() = vec![0.0; values.len()];
        }
        self.barrier.wait();
        self.total.lock().unwrap().iter_mut().zip(values.iter()).for_each(|(t, v)| *t += v);
        self.barrier.wait();
        values.copy_from_slice(&self.total.lock().unwrap());
    }
}

impl ReplicaSum for ThreadReplicas {
    fn sum_f32(&self, values: &mut [f32]) -> beit_core::Result<()> {
        let mut wide: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        self.sum(&mut wide);
        values.iter_mut().zip(wide).for_each(|(v, w)| *v = w as f32);
        Ok(())
    }

    fn sum_f64(&self, values: &mut [f64]) -> beit_core::Result<()> {
        self.sum(values);
        Ok(())
    }
}

pub fn gradient_buffer(model: &mut SegmenterTrainer) -> (Vec<f32>, u64) {
    let g = model.gradients();
    let values = match g.values {
        GradientValues::Host(buf) => buf.to_vec(),
        GradientValues::Device(slot) => slot
            .as_ref()
            .map_or_else(Vec::new, |t| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()),
    };
    (values, *g.count)
}

/// `ours` within `tolerance` of `reference`, relative to the largest reference value.
pub fn assert_close_to(what: &str, ours: &[f32], reference: &[f32], tolerance: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= tolerance * scale, "{what}: differs by {worst:e} (largest value {scale:e})");
}
