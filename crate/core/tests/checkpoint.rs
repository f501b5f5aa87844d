mod common;

use beit_core::{AdamWConfig, BeitConfig, BeitTrainer, MimBatch};
use candle_core::DType;
use common::*;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("beit-core-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn data(cfg: &BeitConfig, seed: u64) -> (Vec<f32>, Vec<u8>, Vec<i32>) {
    let pixels = random_tensor(&[2 * 24], seed, DType::F32).to_vec1::<f32>().unwrap();
    let n = cfg.num_patches();
    let mask = (0..2 * n).map(|i| (i % 2) as u8).collect();
    let targets = (0..2 * n).map(|i| (i % cfg.vocab_size) as i32).collect();
    (pixels, mask, targets)
}

fn step(t: &mut BeitTrainer, seed: u64) -> f64 {
    let (p, m, tg) = data(&t.config.clone(), seed);
    t.train_step(&MimBatch { pixels: &p, mask: &m, targets: &tg }, 1e-3, seed).unwrap().loss
}

#[test]
fn save_then_load_resumes_exactly() {
    let dir = temp_dir("resume");
    let cfg = BeitConfig { drop_path_rate: 0.2, ..tiny_config() };
    let mut a = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 11).unwrap();
    for s in 0..3 {
        step(&mut a, s);
    }
    let path = dir.join("ckpt.safetensors");
    a.save(&path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("ckpt.safetensors")], "no temp file is left");

    let mut b = BeitTrainer::load(&path, None).unwrap();
    assert_eq!(b.config, cfg);
    assert_eq!(b.optimizer_step(), 3);
    for ((na, va), (nb, vb)) in a.weights().unwrap().iter().zip(&b.weights().unwrap()) {
        assert_eq!(na, nb);
        let d = (va - vb).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{na} differs after load");
    }
    // The next steps (same data, same stochastic-depth seeds) give identical losses.
    for s in 3..6 {
        assert_eq!(step(&mut a, s), step(&mut b, s), "step {s}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// With a config given, a checkpoint's own config must be that one (drop path aside): tensor
/// shapes alone would let a grid's relative tables load as its transpose's (the same length).
#[test]
fn loading_into_another_config_names_the_fields_that_differ() {
    let dir = temp_dir("mismatch");
    let path = dir.join("m.safetensors");
    BeitTrainer::new(tiny_config(), AdamWConfig::default(), 1).unwrap().save(&path).unwrap();
    let other = BeitConfig { hidden_size: 12, intermediate_size: 12, ..tiny_config() };
    let err = BeitTrainer::load(&path, Some(other)).err().expect("must fail").to_string();
    assert!(err.contains("hiddenSize (8 in the file, 12 given)"), "{err}");
    let fewer_layers = BeitConfig { num_hidden_layers: 1, ..tiny_config() };
    let err = BeitTrainer::load(&path, Some(fewer_layers)).err().expect("must fail").to_string();
    assert!(err.contains("numHiddenLayers (2 in the file, 1 given)"), "{err}");
    let [h, w] = tiny_config().image_size;
    let transposed = BeitConfig { image_size: [w, h], ..tiny_config() };
    let err = BeitTrainer::load(&path, Some(transposed)).err().expect("must fail").to_string();
    assert!(err.contains("imageSize ("), "{err}");
    let more_drop_path = BeitConfig { drop_path_rate: 0.3, ..tiny_config() };
    assert_eq!(BeitTrainer::load(&path, Some(more_drop_path)).unwrap().config.drop_path_rate, 0.3);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unreadable_or_foreign_files_are_clear_errors() {
    let dir = temp_dir("bad");
    let missing = BeitTrainer::load(&dir.join("nope.safetensors"), None).err().unwrap().to_string();
    assert!(missing.contains("cannot read") && missing.contains("nope.safetensors"), "{missing}");
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let err = BeitTrainer::load(&junk, None).err().unwrap().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");
    let err = BeitTrainer::new(tiny_config(), AdamWConfig::default(), 1)
        .unwrap()
        .save(&dir.join("no/such/dir/x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot write"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
