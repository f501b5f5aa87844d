//! The vendored candle-core's backward pass (crate/vendor: a node's first gradient contribution
//! is stored as is, later ones added): sums over fan-in, signs of the subtracting rules, and no
//! aliasing between nodes that received the same gradient tensor; and the two backward rules
//! the patch fixes, which only beit's GPU path uses (max_pool2d's share of a window's gradient,
//! upsample_nearest2d's sum with the input's other uses).

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn var(v: &[f64]) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn a_single_negating_consumer_gives_the_negated_gradient() {
    let x = var(&[1.0, -2.0, 3.0]);
    let c = Tensor::new(&[5.0f64, 5.0, 5.0], &Device::Cpu).unwrap();
    // d/dx sum(-x) = -1, d/dx sum(c - x) = -1, d/dx sum(1 / x) = -1 / x^2.
    let neg = x.neg().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(neg.get(&x).unwrap()), [-1.0, -1.0, -1.0]);
    let sub = (&c - x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(sub.get(&x).unwrap()), [-1.0, -1.0, -1.0]);
    let recip = x.recip().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(recip.get(&x).unwrap()), [-1.0, -0.25, -1.0 / 9.0]);
}

#[test]
fn contributions_over_fan_in_are_summed_with_their_signs() {
    let x = var(&[1.0, -2.0, 3.0]);
    let c = Tensor::new(&[5.0f64, 5.0, 5.0], &Device::Cpu).unwrap();
    // sum(3x + (c - x) - x + x^2): d/dx = 3 - 1 - 1 + 2x.
    let t = x.as_tensor();
    let y = ((t * 3.0).unwrap() + (&c - t).unwrap()).unwrap();
    let y = ((y - t).unwrap() + t.sqr().unwrap()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), [3.0, -3.0, 7.0]);
}

#[test]
fn nodes_that_share_a_first_gradient_keep_their_own_sums() {
    // x + w hands both the same upstream gradient; x then gets 3 more from 3x. Stored without a
    // copy, that tensor must not be changed in place by x's later sum.
    let (x, w) = (var(&[1.0, 2.0]), var(&[0.5, 0.25]));
    let (xt, wt) = (x.as_tensor(), w.as_tensor());
    let y = ((xt + wt).unwrap() + (xt * 3.0).unwrap()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), [4.0, 4.0]);
    assert_eq!(values(grads.get(&w).unwrap()), [1.0, 1.0]);
}

#[test]
fn a_broadcast_gradient_is_reduced_and_stored_contiguous() {
    // sum_all hands x a stride-0 view of one value: stored, it is materialised.
    let x = var(&[1.0, 2.0, 3.0]);
    let grads = x.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).unwrap().is_contiguous());
    assert_eq!(values(grads.get(&x).unwrap()), [1.0, 1.0, 1.0]);
    // A row added to every row of a [3, 2] map: its gradient sums the 3 rows.
    let row = var(&[1.0, 2.0]);
    let map = Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
    let y = map.broadcast_add(row.as_tensor()).unwrap().sqr().unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    // d/drow sum((map + row)^2) = 2 * sum over rows of (map + row).
    assert_eq!(values(grads.get(&row).unwrap()), [2.0 * (2.0 + 4.0 + 6.0), 2.0 * (4.0 + 6.0 + 8.0)]);
    let sum = map.sum_all().unwrap().broadcast_as((3, 2)).unwrap();
    let grads = (sum * row.as_tensor().unsqueeze(0).unwrap().broadcast_as((3, 2)).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(values(grads.get(&row).unwrap()), [63.0, 63.0]);
}

/// 2x2 windows: [[1, 4], [2, 3]] has one maximum, [[5, 5], [0, 5]] three. The single maximum
/// gets the window's whole gradient (unpatched candle gave it a quarter), tied maxima share it.
#[test]
fn max_pool_gives_a_window_gradient_to_its_maxima() {
    let x =
        Var::from_tensor(&Tensor::new(&[1.0f64, 4.0, 5.0, 5.0, 2.0, 3.0, 0.0, 5.0], &Device::Cpu).unwrap()).unwrap();
    let image = x.as_tensor().reshape((1, 1, 2, 4)).unwrap();
    let y = image.max_pool2d(2).unwrap();
    assert_eq!(values(&y), [4.0, 5.0]);
    let probe = Tensor::new(&[[[[2.0f64, 3.0]]]], &Device::Cpu).unwrap();
    let grads = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), [0.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
}

/// x feeds both a 2x nearest upsampling and a product of its own: x's gradient is the sum of
/// each upsampled 2x2 block's gradient plus the other use's (unpatched candle kept only the
/// upsampling's, whichever came last in the backward order).
#[test]
fn upsampling_adds_to_the_other_uses_of_its_input() {
    let x = Var::from_tensor(&Tensor::new(&[[[[1.0f64, 2.0]]]], &Device::Cpu).unwrap()).unwrap();
    let up = x.as_tensor().upsample_nearest2d(2, 4).unwrap();
    let probe = Tensor::new(&[[[[1.0f64, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]]], &Device::Cpu).unwrap();
    let own = (x.as_tensor() * 10.0).unwrap().sum_all().unwrap();
    let loss = ((up * probe).unwrap().sum_all().unwrap() + own).unwrap();
    let grads = loss.backward().unwrap();
    // Blocks: 1 + 2 + 5 + 6 = 14 and 3 + 4 + 7 + 8 = 22, plus 10 each.
    assert_eq!(values(grads.get(&x).unwrap()), [24.0, 32.0]);
    let x1 = Var::from_tensor(&Tensor::new(&[[[1.0f64, 2.0]]], &Device::Cpu).unwrap()).unwrap();
    let up1 = x1.as_tensor().upsample_nearest1d(4).unwrap();
    let probe1 = Tensor::new(&[[[1.0f64, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
    let loss1 = ((up1 * probe1).unwrap().sum_all().unwrap() + x1.as_tensor().sum_all().unwrap()).unwrap();
    assert_eq!(values(loss1.backward().unwrap().get(&x1).unwrap()), [4.0, 8.0]);
}
