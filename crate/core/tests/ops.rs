//! Forward values of the fused ops against straightforward compositions.
mod common;

use beit_core::ops;
use candle_core::{DType, Device, Tensor, D};
use common::random_tensor;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn layer_norm_matches_the_definition() {
    let x = random_tensor(&[5, 7, 33], 1, DType::F32);
    let g = random_tensor(&[33], 2, DType::F32);
    let b = random_tensor(&[33], 3, DType::F32);
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let expected = xc
        .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&g)
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    assert!(max_diff(&ops::layer_norm(&x, &g, &b, 1e-6).unwrap(), &expected) < 1e-5);
}

#[test]
fn softmax_matches_the_definition_and_is_stable() {
    let x = (random_tensor(&[4, 3, 50], 4, DType::F32) * 30.0).unwrap();
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
    let expected = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    assert!(max_diff(&ops::softmax_last_dim(&x).unwrap(), &expected) < 1e-6);
    let big = Tensor::new(&[[1000f32, 1000.0, -1000.0]], &Device::Cpu).unwrap();
    let y = ops::softmax_last_dim(&big).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y, vec![vec![0.5, 0.5, 0.0]]);
}

#[test]
fn scaled_softmax_applies_scale_and_repeated_bias() {
    let x = random_tensor(&[2, 3, 5, 5], 5, DType::F32);
    let bias = random_tensor(&[3, 5, 5], 6, DType::F32);
    let z = (x.affine(0.35, 0.0).unwrap()).broadcast_add(&bias).unwrap();
    let e = z.broadcast_sub(&z.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
    let expected = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    assert!(max_diff(&ops::scaled_softmax(&x, Some(&bias), 0.35).unwrap(), &expected) < 1e-6);
    let no_bias = ops::softmax_last_dim(&x.affine(0.35, 0.0).unwrap()).unwrap();
    assert!(max_diff(&ops::scaled_softmax(&x, None, 0.35).unwrap(), &no_bias) < 1e-6);
}

#[test]
fn scaled_softmax_rejects_a_bias_of_the_wrong_shape() {
    let x = random_tensor(&[2, 3, 5, 5], 5, DType::F32);
    let err = ops::scaled_softmax(&x, Some(&random_tensor(&[3, 5, 4], 6, DType::F32)), 1.0).unwrap_err().to_string();
    assert!(err.contains("bias of shape [3, 5, 4] must match the trailing dimensions of x [2, 3, 5, 5]"), "{err}");
}

#[test]
fn gelu_matches_erf_form() {
    let x = Tensor::new(&[-3.0f64, -1.0, 0.0, 0.5, 2.0], &Device::Cpu).unwrap();
    let y = ops::gelu_erf(&x).unwrap().to_vec1::<f64>().unwrap();
    // x * Phi(x), computed with Python's math.erf.
    let expected = [-0.00404969409489031, -0.15865525393145707, 0.0, 0.34573123063700656, 1.9544997361036416];
    for (a, b) in y.iter().zip(expected) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}

#[test]
fn cross_entropy_matches_log_softmax_and_checks_targets() {
    let z = (random_tensor(&[6, 9], 5, DType::F32) * 5.0).unwrap();
    let t = Tensor::new(&[0u32, 8, 3, 3, 1, 7], &Device::Cpu).unwrap();
    let ls = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
    let expected = ls.gather(&t.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap();
    assert!(max_diff(&ops::cross_entropy_rows(&z, &t).unwrap(), &expected) < 1e-5);
    let bad = Tensor::new(&[0u32, 9, 0, 0, 0, 0], &Device::Cpu).unwrap();
    let err = ops::cross_entropy_rows(&z, &bad).unwrap_err().to_string();
    assert!(err.contains("target 9 out of range for a vocabulary of 9"), "{err}");
}

#[test]
fn sum_of_squares_adds_up_every_tensor() {
    let a = Tensor::new(&[[1.0f32, -2.0], [3.0, 0.5]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[4.0f64, -0.25], &Device::Cpu).unwrap();
    let total = ops::sum_of_squares(&[&a, &b]).unwrap();
    assert_eq!(total, 1.0 + 4.0 + 9.0 + 0.25 + 16.0 + 0.0625);
    assert_eq!(ops::sum_of_squares(&[]).unwrap(), 0.0);
    let err = ops::sum_of_squares(&[&a.to_dtype(DType::U32).unwrap()]).unwrap_err().to_string();
    assert!(err.contains("unsupported dtype"), "{err}");
}
