//! A steady-state training step allocates little: activations, gradients and optimizer state
//! are allocated by the first step of a batch shape and reused after; what remains per step is
//! gemm's packing buffers and a few small vectors. Counted with a counting allocator (its own
//! test binary: the allocator is process-wide).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use beit_core::{AdamWConfig, BeitConfig, BeitTrainer, DvaeTrainer, DvaeTrainingOptions, ImageBatch};
use common::*;

struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated by `f`.
fn allocated(f: impl FnOnce()) -> usize {
    let before = BYTES.load(Ordering::Relaxed);
    f();
    BYTES.load(Ordering::Relaxed) - before
}

#[test]
fn steady_state_steps_allocate_a_fifth_of_the_first_at_most() {
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
    eprintln!("MIM step: first {first} bytes, steady {steady} bytes");
    assert!(steady * 5 < first, "a steady MIM step allocated {steady} bytes, the first {first}");

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
    eprintln!("tokenizer step: first {first} bytes, steady {steady} bytes");
    assert!(steady * 5 < first, "a steady tokenizer step allocated {steady} bytes, the first {first}");
}
