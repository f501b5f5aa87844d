//! Parity with the reference implementations, on fixtures made by
//! scripts/interop/make_fixtures.py: transformers' BEiT (MIM, classification with mean and
//! [CLS] pooling, bare BeitModel, shared and per-layer bias, absolute positions, 1 and 3
//! channels, a non-square grid, a resolution change) and OpenAI's DALL-E dVAE package.
//! Also: export -> import round trips and the errors for checkpoints that do not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use beit_core::arch::classification::ClassifierParams;
use beit_core::arch::dvae::DvaeParams;
use beit_core::arch::mim::MimParams;
use beit_core::config::Pooling;
use beit_core::hf::{self, HfLayout};
use beit_core::model::classification::BeitForImageClassification;
use beit_core::model::dvae::{map_pixels, Dvae};
use beit_core::model::mim::BeitForMaskedImageModeling;
use beit_core::model::Vars;
use beit_core::params::{ParamTable, Source};
use beit_core::{AdamWConfig, BeitTrainer, ClassifierTrainer, ClassifierTrainingOptions, DvaeTrainer, ImageBatch};
use candle_core::{Device, Tensor};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn read_io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(what: &str, ours: &[f32], reference: &[f32]) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
    let worst = ours.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("{what}: max abs difference {worst:.2e}");
    assert!(worst < TOLERANCE, "{what}: max abs difference {worst:e} exceeds {TOLERANCE:e}");
    // A fixture of zeros would pass anything: the reference must carry signal.
    assert!(reference.iter().any(|v| v.abs() > 1e-2), "{what}: reference is all near zero");
}

/// The fixture's MIM logits [B, N, V] at the masked positions, batch-major.
fn masked_rows(logits: &Tensor, mask: &[u8]) -> Vec<f32> {
    let (b, n, v) = logits.dims3().unwrap();
    let all = values(logits);
    let mut out = Vec::new();
    for i in 0..b * n {
        if mask[i] != 0 {
            out.extend_from_slice(&all[i * v..(i + 1) * v]);
        }
    }
    out
}

/// The candle model (the GPU path) of `table` with a trainer's weights, for the hidden states.
fn candle_model<M>(
    table: &ParamTable,
    weights: Vec<(String, Tensor)>,
    new: impl FnOnce(&Vars) -> candle_core::Result<M>,
) -> M {
    let source = Source::tensors(weights.into_iter().collect());
    new(&Vars::from_source(table, source, candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap()
}

fn mim_model(model: &BeitTrainer) -> BeitForMaskedImageModeling {
    let (table, p) = MimParams::new(&model.config);
    candle_model(&table, model.weights().unwrap(), |v| {
        BeitForMaskedImageModeling::new(&model.config, &p, v, &Device::Cpu)
    })
}

fn classifier_model(model: &ClassifierTrainer) -> BeitForImageClassification {
    let (table, p) = ClassifierParams::new(&model.config);
    let new = |v: &Vars| BeitForImageClassification::new(&model.config, &p, v, &Device::Cpu);
    candle_model(&table, model.weights().unwrap(), new)
}

fn mim_parity(name: &str, image_size: Option<[usize; 2]>) -> BeitTrainer {
    let dir = fixture(&format!("hf/{name}"));
    let io = read_io(&dir);
    let ckpt = hf::read(&dir, image_size).unwrap();
    assert_eq!(ckpt.layout, HfLayout::MaskedImageModeling);
    let mut model = BeitTrainer::from_hf(ckpt, AdamWConfig::default()).unwrap();
    let pixels = &io["pixel_values"];
    let mask: Vec<u8> = io["bool_masked_pos"].flatten_all().unwrap().to_vec1().unwrap();
    let predictions = model.forward(&values(pixels), &mask).unwrap();
    assert_close(&format!("{name} logits"), &predictions.logits, &masked_rows(&io["logits"], &mask));
    let (b, n) = io["bool_masked_pos"].dims2().unwrap();
    let mask_t = Tensor::from_vec(mask.iter().map(|&m| m as f32).collect::<Vec<_>>(), (b, n), &Device::Cpu).unwrap();
    let reference = mim_model(&model);
    let backbone = reference.backbone();
    let hidden = backbone.forward(pixels, Some(&mask_t), None, backbone.num_layers()).unwrap();
    assert_close(&format!("{name} last hidden state"), &values(&hidden), &values(&io["last_hidden_state"]));
    model
}

#[test]
fn mim_with_shared_bias_matches_transformers() {
    mim_parity("mim-shared", None);
}

#[test]
fn grayscale_mim_with_absolute_positions_and_per_layer_bias_matches_transformers() {
    let model = mim_parity("mim-abs-gray", None);
    // layer_norm_eps comes from the config (transformers' default 1e-12 here, ours 1e-6).
    assert_eq!(model.config.layer_norm_eps, 1e-12);
    assert_eq!(model.config.num_channels, 1);
}

#[test]
fn resolution_change_on_import_matches_transformers_interpolation() {
    let model = mim_parity("mim-resize", Some([20, 20]));
    assert_eq!(model.config.grid(), (5, 5));
}

fn classifier_parity(name: &str) -> ClassifierTrainer {
    let dir = fixture(&format!("hf/{name}"));
    let io = read_io(&dir);
    let ckpt = hf::read(&dir, None).unwrap();
    assert_eq!(ckpt.layout, HfLayout::ImageClassification);
    let mut model =
        ClassifierTrainer::from_hf(ckpt, None, AdamWConfig::default(), ClassifierTrainingOptions::default(), 0)
            .unwrap();
    let pixels = &io["pixel_values"];
    assert_close(&format!("{name} logits"), &model.predict(&values(pixels)).unwrap(), &values(&io["logits"]));
    let reference = classifier_model(&model);
    let backbone = reference.backbone();
    let hidden = backbone.forward(pixels, None, None, backbone.num_layers()).unwrap();
    assert_close(&format!("{name} last hidden state"), &values(&hidden), &values(&io["last_hidden_state"]));
    model
}

#[test]
fn mean_pooled_classifier_on_a_non_square_grid_matches_the_reference() {
    let model = classifier_parity("cls-mean-nonsquare");
    assert_eq!((model.config.pooling, model.config.num_labels), (Pooling::Mean, 3));
    assert_eq!(model.config.model.grid(), (2, 4));
}

#[test]
fn cls_pooled_classifier_with_absolute_positions_matches_transformers() {
    let model = classifier_parity("cls-token-abs");
    assert_eq!((model.config.pooling, model.config.num_labels), (Pooling::Cls, 5));
}

#[test]
fn bare_beit_model_imports_under_a_new_head() {
    let dir = fixture("hf/model-pooler");
    let io = read_io(&dir);
    let ckpt = hf::read(&dir, None).unwrap();
    assert_eq!(ckpt.layout, HfLayout::Model);
    let no_labels = ClassifierTrainer::from_hf(
        hf::read(&dir, None).unwrap(),
        None,
        AdamWConfig::default(),
        ClassifierTrainingOptions::default(),
        0,
    );
    assert!(no_labels.err().unwrap().to_string().contains("numLabels is required"));
    let mut model =
        ClassifierTrainer::from_hf(ckpt, Some(4), AdamWConfig::default(), ClassifierTrainingOptions::default(), 0)
            .unwrap();
    let pixels = &io["pixel_values"];
    let reference = classifier_model(&model);
    let pooled = reference.pooled(pixels, None).unwrap();
    assert_close("model-pooler pooler_output", &values(&pooled), &values(&io["pooler_output"]));
    let backbone = reference.backbone();
    let hidden = backbone.forward(pixels, None, None, backbone.num_layers()).unwrap();
    assert_close("model-pooler last hidden state", &values(&hidden), &values(&io["last_hidden_state"]));
    assert_eq!(model.predict(&values(pixels)).unwrap().len(), 2 * 4);
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("beit-interop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn export_then_import_round_trips_mim_and_classifier() {
    let dir = fixture("hf/mim-shared");
    let io = read_io(&dir);
    let mask: Vec<u8> = io["bool_masked_pos"].flatten_all().unwrap().to_vec1().unwrap();
    let pixels = values(&io["pixel_values"]);
    let mut model = BeitTrainer::from_hf(hf::read(&dir, None).unwrap(), AdamWConfig::default()).unwrap();
    let out = temp_dir("mim");
    model.export_hf(&out).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BeitForMaskedImageModeling");
    assert_eq!(config["use_mask_token"], true);
    assert_eq!(config["use_shared_relative_position_bias"], true);
    assert_eq!(config["layer_norm_eps"], 1e-6);
    let mut again = BeitTrainer::from_hf(hf::read(&out, None).unwrap(), AdamWConfig::default()).unwrap();
    assert_eq!(again.config, model.config);
    assert_eq!(again.forward(&pixels, &mask).unwrap().logits, model.forward(&pixels, &mask).unwrap().logits);
    std::fs::remove_dir_all(&out).unwrap();

    for name in ["cls-token-abs", "cls-mean-nonsquare"] {
        let dir = fixture(&format!("hf/{name}"));
        let pixels = values(&read_io(&dir)["pixel_values"]);
        let mut model = ClassifierTrainer::from_hf(
            hf::read(&dir, None).unwrap(),
            None,
            AdamWConfig::default(),
            ClassifierTrainingOptions::default(),
            0,
        )
        .unwrap();
        let out = temp_dir(name);
        model.export_hf(&out).unwrap();
        let mut again = ClassifierTrainer::from_hf(
            hf::read(&out, None).unwrap(),
            None,
            AdamWConfig::default(),
            ClassifierTrainingOptions::default(),
            1,
        )
        .unwrap();
        assert_eq!(again.config, model.config, "{name}");
        assert_eq!(again.predict(&pixels).unwrap(), model.predict(&pixels).unwrap(), "{name}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn checkpoints_that_do_not_fit_list_every_problem() {
    let src = fixture("hf/mim-shared");
    let dir = temp_dir("broken");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("beit.encoder.layer.0.attention.attention.key.weight").unwrap();
    tensors.remove("lm_head.bias").unwrap();
    tensors.insert(
        "beit.encoder.layer.1.intermediate.dense.bias".into(),
        Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert("beit.extra.weight".into(), Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = BeitTrainer::from_hf(hf::read(&dir, None).unwrap(), AdamWConfig::default()).err().unwrap().to_string();
    for expected in [
        "beit.encoder.layer.0.attention.attention.key.weight [32, 32]",
        "lm_head.bias [64]",
        "beit.encoder.layer.1.intermediate.dense.bias is [5], expected [64]",
        "does not use: beit.extra.weight",
    ] {
        assert!(err.contains(expected), "error should name {expected:?}: {err}");
    }

    // A classification checkpoint cannot be pretrained; a config of another model is refused.
    let cls = hf::read(&fixture("hf/cls-token-abs"), None).unwrap();
    let err = BeitTrainer::from_hf(cls, AdamWConfig::default()).err().unwrap().to_string();
    assert!(err.contains("BeitForImageClassification") && err.contains("BeitForMaskedImageModeling"), "{err}");
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), text.replace("\"model_type\": \"beit\"", "\"model_type\": \"vit\""))
        .unwrap();
    let err = hf::read(&dir, None).err().unwrap().to_string();
    assert!(err.contains("model_type is \"vit\", expected \"beit\""), "{err}");
    std::fs::write(dir.join("config.json"), text).unwrap();
    let err = hf::read(&dir, Some([18, 18])).err().unwrap().to_string();
    assert!(err.contains("multiple of patchSize 4"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resizing_keeps_the_cls_entries_and_is_the_identity_at_the_same_size() {
    let table = Tensor::arange(0f32, ((2 * 3 - 1) * (2 * 4 - 1) + 3) as f32 * 2.0, &Device::Cpu)
        .unwrap()
        .reshape((38, 2))
        .unwrap();
    let same = hf::resize_relative_position_table(&table, (3, 4), (3, 4)).unwrap();
    assert_eq!(values(&same), values(&table));
    let bigger = hf::resize_relative_position_table(&table, (3, 4), (5, 6)).unwrap();
    assert_eq!(bigger.dims(), &[9 * 11 + 3, 2]);
    assert_eq!(values(&bigger)[99 * 2..], values(&table)[35 * 2..]);
    // A linear ramp stays a ramp of the same range under bilinear resampling (corners kept).
    let v = values(&bigger);
    assert_eq!((v[0], v[(9 * 11 - 1) * 2]), (0.0, 34.0 * 2.0));
    let pos = Tensor::arange(0f32, 10.0 * 3.0, &Device::Cpu).unwrap().reshape((1, 10, 3)).unwrap();
    let same = hf::resize_position_embeddings(&pos, (3, 3), (3, 3)).unwrap();
    let (a, b) = (values(&same), values(&pos));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
}

#[test]
fn dall_e_weights_converted_from_the_package_match_its_encoder_and_decoder() {
    let dir = fixture("dalle");
    let io = read_io(&dir);
    let mut tokenizer = DvaeTrainer::load(&dir.join("dvae.safetensors"), None).unwrap();
    assert_eq!((tokenizer.config.num_groups, tokenizer.config.vocab_size), (4, 32));
    let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    let (table, p) = DvaeParams::new(&tokenizer.config);
    let reference = candle_model(&table, tokenizer.weights().unwrap(), |v| Ok(Dvae::new(&tokenizer.config, &p, v)));
    let pixels = nhwc(&io["pixels"]);
    let logits = reference.encoder.forward(&map_pixels(&pixels).unwrap()).unwrap();
    assert_close("DALL-E encoder logits", &values(&logits), &values(&nhwc(&io["logits"])));
    let ids: Vec<i32> = io["ids"].flatten_all().unwrap().to_vec1().unwrap();
    let one_hot: Vec<f32> = ids.iter().flat_map(|&i| (0..32).map(move |k| if k == i { 1.0 } else { 0.0 })).collect();
    let one_hot = Tensor::from_vec(one_hot, (2, 2, 2, 32), &Device::Cpu).unwrap();
    let decoded = reference.decoder.forward(&one_hot).unwrap();
    assert_close("DALL-E decoder output", &values(&decoded), &values(&nhwc(&io["decoded"])));
    // The CPU engine (what encode and decode run on) gives the package's ids and images.
    let (_, _, h, w) = io["pixels"].dims4().unwrap();
    let nchw = values(&io["pixels"]);
    assert_eq!(tokenizer.encode(&ImageBatch { pixels: &nchw, height: h, width: w }).unwrap(), ids, "DALL-E ids");
    let images = reference.reconstruction(&nhwc(&io["decoded"])).unwrap().permute((0, 3, 1, 2)).unwrap();
    assert_close("DALL-E reconstructions", &tokenizer.decode(&ids, 2, 2).unwrap(), &values(&images));
}
