//! Training and inference of the dVAE tokenizer: Gumbel-softmax relaxation, logit-Laplace (or
//! MSE) reconstruction, KL to a uniform prior, AdamW, optional EMA of the weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, InplaceOp2, Layout, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::device::Precision;
use crate::dvae::{map_pixels, Dvae, DvaeConfig};
use crate::error::{Error, Result};
use crate::ops::{scaled_softmax, softmax_last_dim};
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{rebuild_on, NamedVars, ParamStore};
use crate::rng::SplitMix64;

const FORMAT: &str = "beit-dvae/1";
const OPTIM_PREFIX: &str = "optimizer.";
const EMA_PREFIX: &str = "ema.";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReconLoss {
    /// DALL-E's logit-Laplace likelihood on mapped pixels.
    LogitLaplace,
    /// Squared error of sigmoid(mu) against the mapped pixels.
    Mse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TokenizerTraining {
    pub optimizer: AdamWConfig,
    /// EMA decay of the weights (DALL-E: 0.999); 0 turns EMA off. Encode/decode use the EMA
    /// weights when it is on.
    pub ema_decay: f64,
    pub recon_loss: ReconLoss,
}

impl Default for TokenizerTraining {
    /// DALL-E's dVAE recipe: AdamW (0.9, 0.999, 1e-8), wd 1e-4, EMA 0.999, logit-Laplace.
    fn default() -> Self {
        Self {
            optimizer: AdamWConfig { weight_decay: 1e-4, clip_grad_norm: 0.0, ..AdamWConfig::default() },
            ema_decay: 0.999,
            recon_loss: ReconLoss::LogitLaplace,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TokenizerStepMetrics {
    /// The optimised objective: recon + klWeight * KL, both per pixel value.
    pub loss: f64,
    /// Reconstruction loss per pixel value.
    pub recon_loss: f64,
    /// KL(q || uniform) per token position, in nats.
    pub kl: f64,
    /// exp(entropy) of the batch's argmax-code histogram.
    pub perplexity: f64,
    /// Distinct argmax codes in the batch.
    pub codes_used: usize,
    pub grad_norm: f64,
}

struct Ema {
    decay: f64,
    vars: NamedVars,
    model: Dvae,
}

pub struct TokenizerTrainer {
    pub config: DvaeConfig,
    pub training: TokenizerTraining,
    pub model: Dvae,
    pub vars: NamedVars,
    pub optimizer: AdamW,
    ema: Option<Ema>,
    device: Device,
    /// The precision of `encode` (training and decoding run in f32).
    encode_precision: Precision,
}

/// Images of a batch: [B, C, H, W] in [0, 1].
pub struct ImageBatch<'a> {
    pub pixels: &'a [f32],
    pub height: usize,
    pub width: usize,
}

impl TokenizerTrainer {
    pub fn new(config: DvaeConfig, training: TokenizerTraining, seed: u64) -> Result<Self> {
        config.validate()?;
        let device = Device::Cpu;
        let (model, vars) = ParamStore::initialise(seed).build(DType::F32, &device, |vb| Dvae::new(&config, vb))?;
        // The EMA starts as a copy of the initial weights.
        let ema_init: HashMap<String, Tensor> =
            vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
        Self::assemble(config, training, model, vars, Some(ema_init), device)
    }

    fn assemble(
        config: DvaeConfig,
        training: TokenizerTraining,
        model: Dvae,
        vars: NamedVars,
        ema_tensors: Option<HashMap<String, Tensor>>,
        device: Device,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&training.ema_decay) {
            return Err(Error::Config(format!("emaDecay must be in [0, 1), got {}", training.ema_decay)));
        }
        let ema = match ema_tensors {
            Some(t) if training.ema_decay > 0.0 => {
                let (model, vars) = ParamStore::from_tensors(t).build(DType::F32, &device, |vb| Dvae::new(&config, vb))?;
                Some(Ema { decay: training.ema_decay, vars, model })
            }
            _ => None,
        };
        let optimizer = AdamW::new(training.optimizer.clone(), &vars)?;
        Ok(Self { config, training, model, vars, optimizer, ema, device, encode_precision: Precision::F32 })
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn encode_precision(&self) -> Precision {
        self.encode_precision
    }

    /// Sets the precision of `encode`. bf16 suits MIM targets, which need only the argmax;
    /// the tokenizer's own training and decoding stay f32.
    pub fn set_encode_precision(&mut self, precision: Precision) {
        self.encode_precision = precision;
    }

    /// Moves the weights, their EMA and the optimizer state to `device`.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        let config = &self.config;
        let (model, vars) = rebuild_on(&self.vars, device, |vb| Dvae::new(config, vb))?;
        self.optimizer.move_to(&vars, device)?;
        if let Some(ema) = &mut self.ema {
            (ema.model, ema.vars) = rebuild_on(&ema.vars, device, |vb| Dvae::new(config, vb))?;
        }
        (self.model, self.vars, self.device) = (model, vars, device.clone());
        Ok(())
    }

    fn eval_model(&self) -> &Dvae {
        self.ema.as_ref().map_or(&self.model, |e| &e.model)
    }

    /// [B, C, H, W] in [0, 1] -> [B, H, W, C] tensor, with the shape checks.
    fn images(&self, batch: &ImageBatch) -> Result<Tensor> {
        let c = self.config.num_channels;
        let (h, w) = (batch.height, batch.width);
        let d = self.config.downsample();
        if h == 0 || w == 0 || h % d != 0 || w % d != 0 {
            return Err(Error::Input(format!(
                "image size {h}x{w}: height and width must be positive multiples of the tokenizer's downsampling factor {d}"
            )));
        }
        let per = c * h * w;
        if batch.pixels.is_empty() || batch.pixels.len() % per != 0 {
            return Err(Error::Input(format!(
                "pixels: expected a positive multiple of {per} values (C*H*W = {c}*{h}*{w}), got {}",
                batch.pixels.len()
            )));
        }
        if let Some(i) = batch.pixels.iter().position(|v| !(0.0..=1.0).contains(v)) {
            return Err(Error::Input(format!(
                "pixels: tokenizer inputs must be in [0, 1], got {} at index {i}",
                batch.pixels[i]
            )));
        }
        let b = batch.pixels.len() / per;
        Ok(Tensor::from_slice(batch.pixels, (b, c, h, w), &self.device)?.permute((0, 2, 3, 1))?.contiguous()?)
    }

    pub fn train_step(&mut self, batch: &ImageBatch, temperature: f64, kl_weight: f64, lr: f64, seed: u64) -> Result<TokenizerStepMetrics> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::Input(format!("temperature must be a finite number > 0, got {temperature}")));
        }
        if !(kl_weight >= 0.0 && kl_weight.is_finite()) {
            return Err(Error::Input(format!("klWeight must be a finite number >= 0, got {kl_weight}")));
        }
        let x = map_pixels(&self.images(batch)?)?;
        let logits = self.model.encoder.forward(&x)?;
        let (b, h, w, v) = logits.dims4()?;
        let soft = scaled_softmax(&(&logits + gumbel_noise(logits.dims(), seed, &self.device)?)?, None, 1.0 / temperature)?;
        let out = self.model.decoder.forward(&soft)?;
        let recon = reconstruction_loss(&out, &x, self.training.recon_loss)?;
        let kl = kl_to_uniform(&logits)?;
        let values_per_position = (x.elem_count() / (b * h * w)) as f64;
        let loss = (&recon + (&kl * (kl_weight / values_per_position))?)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            return Err(Error::Numeric(format!("tokenizer loss is {loss_value}: the update was skipped")));
        }
        let grads = loss.backward()?;
        let grad_norm = self.optimizer.step(&grads, lr)?;
        if let Some(ema) = &self.ema {
            for ((_, e), (_, p)) in ema.vars.iter().zip(&self.vars) {
                e.as_tensor().inplace_op2(p.as_tensor(), &EmaUpdate { decay: ema.decay })?;
            }
        }
        let ids = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
        let (perplexity, codes_used) = code_usage(&ids, v);
        Ok(TokenizerStepMetrics {
            loss: loss_value,
            recon_loss: recon.to_scalar::<f32>()? as f64,
            kl: kl.to_scalar::<f32>()? as f64,
            perplexity,
            codes_used,
            grad_norm,
        })
    }

    /// Token ids [B, H/d, W/d] (argmax of the encoder logits; deterministic).
    pub fn encode(&self, batch: &ImageBatch) -> Result<Vec<i32>> {
        let x = map_pixels(&self.images(batch)?)?.to_dtype(self.encode_precision.dtype())?;
        let ids = self.eval_model().encoder.forward(&x)?.argmax(D::Minus1)?;
        Ok(ids.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|i| i as i32).collect())
    }

    /// Images [B, C, h*d, w*d] in [0, 1] from ids [B, h, w].
    pub fn decode(&self, ids: &[i32], height: usize, width: usize) -> Result<Vec<f32>> {
        let v = self.config.vocab_size;
        if height == 0 || width == 0 || ids.is_empty() || ids.len() % (height * width) != 0 {
            return Err(Error::Input(format!(
                "ids: expected a positive multiple of {} values (token grid {height}x{width}), got {}",
                height * width,
                ids.len()
            )));
        }
        if let Some(i) = ids.iter().position(|&id| id < 0 || id as usize >= v) {
            return Err(Error::Input(format!("ids: token id {} at index {i} is out of range [0, {v})", ids[i])));
        }
        let b = ids.len() / (height * width);
        let flat: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let one_hot = Tensor::eye(v, DType::F32, &self.device)?
            .index_select(&Tensor::from_vec(flat, ids.len(), &self.device)?, 0)?
            .reshape((b, height, width, v))?;
        let model = self.eval_model();
        let images = model.reconstruction(&model.decoder.forward(&one_hot)?)?;
        Ok(images.permute((0, 3, 1, 2))?.flatten_all()?.to_vec1::<f32>()?)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> =
            self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        for (name, t) in self.optimizer.state_tensors() {
            tensors.push((format!("{OPTIM_PREFIX}{name}"), t));
        }
        if let Some(ema) = &self.ema {
            tensors.extend(ema.vars.iter().map(|(n, v)| (format!("{EMA_PREFIX}{n}"), v.as_tensor().clone())));
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("config".to_string(), self.config.to_json()),
            ("training".to_string(), serde_json::to_string(&self.training).expect("serialisable")),
            ("step".to_string(), self.optimizer.step.to_string()),
        ]);
        checkpoint::save(path, &tensors, metadata)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let mut file = checkpoint::load(path)?;
        let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
        let format = file.meta("format", path)?;
        if format != FORMAT {
            return Err(in_file(Error::Checkpoint(format!("format {format:?}, expected {FORMAT:?} (a tokenizer checkpoint)"))));
        }
        let config = DvaeConfig::from_json(file.meta("config", path)?)?;
        let training: TokenizerTraining = serde_json::from_str(file.meta("training", path)?)
            .map_err(|e| in_file(Error::Checkpoint(format!("bad training metadata: {e}"))))?;
        let step: u64 = file.meta("step", path)?.parse().map_err(|e| in_file(Error::Checkpoint(format!("bad step: {e}"))))?;
        let moments = file.take_prefixed(OPTIM_PREFIX);
        let ema = file.take_prefixed(EMA_PREFIX);
        let device = Device::Cpu;
        let (model, vars) = ParamStore::from_tensors(file.tensors)
            .build(DType::F32, &device, |vb| Dvae::new(&config, vb))
            .map_err(in_file)?;
        let ema = if ema.is_empty() { None } else { Some(ema) };
        let mut trainer = Self::assemble(config, training, model, vars, ema, device).map_err(in_file)?;
        // Weights converted from elsewhere (DALL-E's) come at step 0 without optimizer state.
        if step > 0 || !moments.is_empty() {
            trainer.optimizer.restore(moments, step).map_err(in_file)?;
        }
        Ok(trainer)
    }
}

/// Gumbel(0, 1) noise from a seeded generator, so a step can be replayed.
fn gumbel_noise(dims: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = SplitMix64::new(seed);
    let n: usize = dims.iter().product();
    let g: Vec<f32> = (0..n)
        .map(|_| {
            let u = rng.uniform().max(1e-20);
            -(-u.ln()).ln() as f32
        })
        .collect();
    Ok(Tensor::from_vec(g, dims, device)?)
}

/// Mean reconstruction loss per pixel value. `out`: [B, H, W, 2C] (mu, log b); `x`: mapped
/// pixels [B, H, W, C].
pub fn reconstruction_loss(out: &Tensor, x: &Tensor, kind: ReconLoss) -> candle_core::Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let mu = out.narrow(D::Minus1, 0, c)?;
    match kind {
        ReconLoss::LogitLaplace => {
            // -log f(x | mu, b) = log(2 b x (1 - x)) + |logit(x) - mu| / b
            let log_b = out.narrow(D::Minus1, c, c)?;
            let logit_x = (x.log()? - x.affine(-1.0, 1.0)?.log()?)?;
            let x_term = (x.log()? + x.affine(-1.0, 1.0)?.log()?)?;
            let nll = ((&log_b + x_term)? + ((logit_x - &mu)?.abs()? * log_b.neg()?.exp()?)?)?;
            (nll + std::f64::consts::LN_2)?.mean_all()
        }
        ReconLoss::Mse => (candle_nn::ops::sigmoid(&mu)? - x)?.sqr()?.mean_all(),
    }
}

/// Mean over positions of KL(softmax(logits) || uniform) = sum q log q + log V.
pub fn kl_to_uniform(logits: &Tensor) -> candle_core::Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let q = softmax_last_dim(logits)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let expected_logit = (&q * logits)?.sum_keepdim(D::Minus1)?;
    ((expected_logit - lse)? + (v as f64).ln())?.mean_all()
}

fn code_usage(ids: &[u32], vocab: usize) -> (f64, usize) {
    let mut counts = vec![0usize; vocab];
    for &i in ids {
        counts[i as usize] += 1;
    }
    let n = ids.len() as f64;
    let entropy: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum();
    (entropy.exp(), counts.iter().filter(|&&c| c > 0).count())
}

/// ema = decay * ema + (1 - decay) * p
struct EmaUpdate {
    decay: f64,
}

impl InplaceOp2 for EmaUpdate {
    fn name(&self) -> &'static str {
        "ema-update"
    }

    fn cpu_fwd(&self, s1: &mut candle_core::CpuStorage, l1: &Layout, s2: &candle_core::CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(e), F32(p)) = (s1, s2) else { candle_core::bail!("ema-update: expected f32 tensors") };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("ema-update: expected contiguous tensors")
        };
        let (d, one_minus) = (self.decay as f32, (1.0 - self.decay) as f32);
        for (ei, &pi) in e[a1..b1].iter_mut().zip(&p[a2..b2]) {
            *ei = d * *ei + one_minus * pi;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        use crate::cuda::*;
        use candle_core::backend::BackendStorage;
        let dev = s2.device().clone();
        let p = input::<f32>(self.name(), s2, l2)?;
        let mut e = f32_in_out(self.name(), s1, l1)?;
        let (count, decay) = (l1.shape().elem_count() as u64, self.decay as f32);
        launch!(dev, "ema_update", elementwise(count as usize), [&mut e, &p, &count, &decay])
    }
}
