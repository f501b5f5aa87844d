//! A steady-state training step allocates little: activations, gradients and optimizer state
//! are allocated by the first step of a batch shape and reused after; what remains per step is
//! gemm's packing buffers and small bookkeeping (a few KB each, but one set per GEMM call and
//! thread, so their total depends on the machine's kernels and cache blocking). Counted with a
//! counting allocator (its own test binary: the allocator is process-wide): no steady
//! allocation may be the size of an activation, and the total stays well under the first
//! step's. gemm's packed panels (128-byte aligned, sized by the CPU's caches) are left out.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use beit_core::{AdamWConfig, BeitConfig, BeitTrainer, DvaeTrainer, DvaeTrainingOptions, ImageBatch};
use common::*;

struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// gemm allocates its packed panels with 128-byte alignment; beit's buffers are plain Vecs.
const GEMM_PACKING_ALIGN: usize = 128;

fn count(layout: Layout, size: usize) {
    if layout.align() < GEMM_PACKING_ALIGN {
        BYTES.fetch_add(size, Ordering::Relaxed);
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout, layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout, layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout, new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated by `f`, and its largest allocation.
fn allocated(f: impl FnOnce()) -> (usize, usize) {
    let before = BYTES.load(Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    f();
    (BYTES.load(Ordering::Relaxed) - before, LARGEST.load(Ordering::Relaxed))
}

/// The smallest activation of either model below is larger than this (MIM: [16 * 17, 64] f32 =
/// 68 KiB; tokenizer: [8 * 32 * 32, 3] f32 = 96 KiB).
const ACTIVATION_BYTES: usize = 64 << 10;

fn check(what: &str, (first, first_largest): (usize, usize), (steady, largest): (usize, usize)) {
    eprintln!("{what} step: first {first} bytes (largest {first_largest}), steady {steady} bytes (largest {largest})");
    // The first step allocates the activations: the bound below is one they exceed.
    assert!(first_largest >= ACTIVATION_BYTES, "the first {what} step's largest buffer is {first_largest} bytes");
    assert!(largest < ACTIVATION_BYTES, "a steady {what} step allocated a {largest}-byte buffer");
    assert!(steady * 3 < first, "a steady {what} step allocated {steady} bytes, the first {first}");
}

#[test]
fn steady_state_steps_allocate_no_activation_buffers() {
    let cfg = BeitConfig {
        image_size: [16, 16],
        patch_size: 4,
        hidden_size: 64,
        num_attention_heads: 4,
        intermediate_size: 128,
        vocab_size: 64,
        drop_path_rate: 0.1,
        ..tiny_config()
    };
    let b = batch(&cfg, 16, 1);
    let mut mim = BeitTrainer::new(cfg, AdamWConfig::default(), 3).unwrap();
    let first = allocated(|| {
        mim.train_step(&b.view(), 1e-3, 0).unwrap();
    });
    mim.train_step(&b.view(), 1e-3, 1).unwrap();
    let steady = allocated(|| {
        mim.train_step(&b.view(), 1e-3, 2).unwrap();
    });
    check("MIM", first, steady);

    let dvae = small_dvae_config(32);
    let mut tok = DvaeTrainer::new(dvae, DvaeTrainingOptions::default(), 4).unwrap();
    let pixels: Vec<f32> = unit_pixels(8 * 3 * 1024, 9);
    let images = ImageBatch { pixels: &pixels, height: 32, width: 32 };
    let first = allocated(|| {
        tok.train_step(&images, 1.0, 0.1, 1e-3, 0).unwrap();
    });
    tok.train_step(&images, 1.0, 0.1, 1e-3, 1).unwrap();
    let steady = allocated(|| {
        tok.train_step(&images, 1.0, 0.1, 1e-3, 2).unwrap();
    });
    check("tokenizer", first, steady);
}
