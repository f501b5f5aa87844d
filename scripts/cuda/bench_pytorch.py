#!/usr/bin/env python3
"""The PyTorch side of the BEiT pretraining benchmark: the same work as `npm run bench:cuda`,
in PyTorch eager: a DALL-E-layout dVAE encoder (112 px -> 14x14 ids of 8192, no grad) computes
the targets online, transformers' BeitForMaskedImageModeling (BEiT-B/16 at 224, shared
relative position bias, LayerScale 0.1) predicts them at 40% masked patches, AdamW
(fused, fp32 master weights) steps. bf16 autocast, SDPA where transformers uses it.

    python scripts/cuda/bench_pytorch.py --batch-sizes 64,128,256            # on a GPU host
    python scripts/cuda/bench_pytorch.py --device cpu --preset tiny --batch-sizes 2 --steps 2 --warmup 1

--compile runs the forward and loss through torch.compile (the second reference row).
Prints one JSON line per batch size: images/s, step time split (tokenizer, forward+backward,
optimizer), peak GPU memory, MFU against --peak-tflops (989 = H100 SXM dense bf16).
The head runs on the masked patches only, as beit's does (transformers' forward computes all).
"""
import argparse
import json
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BeitConfig, BeitForMaskedImageModeling

# GFLOP per image, counted as 2 x MAC: backbone + head forward and backward (6 x 18.0 GMAC) and
# the tokenizer's forward (2 x 26.1 GMAC), the accounting for BEiT-B/16 + DALL-E.
GFLOP_PER_IMAGE = {"base": 6 * 18.0 + 2 * 26.1}

PRESETS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 image_size=224, patch_size=16, vocab_size=8192, tok_hidden=256, tok_blocks=2, tok_size=112),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 image_size=32, patch_size=8, vocab_size=64, tok_hidden=16, tok_blocks=1, tok_size=32),
}


class Conv(nn.Conv2d):
    def __init__(self, n_in, n_out, k):
        super().__init__(n_in, n_out, k, padding=(k - 1) // 2)


class EncoderBlock(nn.Module):
    """DALL-E's encoder block: id path (1x1 when widths differ) + post_gain * 4 x (ReLU, conv)."""

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv(n_hid, n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The layout of OpenAI's dall_e.Encoder (4 groups, 2x2 max-pool between them)."""

    def __init__(self, n_hid, n_blk, vocab):
        super().__init__()
        n_layers = 4 * n_blk
        groups, n_in = [], n_hid
        for g in range(4):
            width = n_hid * 2 ** g
            blocks = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else width, width, n_layers)) for i in range(n_blk)]
            if g < 3:
                blocks.append(("pool", nn.MaxPool2d(2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
            n_in = width
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv(3, n_hid, 7)), *groups,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(8 * n_hid, vocab, 1))])))]))

    def forward(self, x):
        return self.blocks(x)


def build(preset, device):
    p = PRESETS[preset]
    config = BeitConfig(
        hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        intermediate_size=p["intermediate_size"], image_size=p["image_size"], patch_size=p["patch_size"],
        vocab_size=p["vocab_size"], use_mask_token=True, use_shared_relative_position_bias=True,
        use_absolute_position_embeddings=False, layer_scale_init_value=0.1, drop_path_rate=0.1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
        attn_implementation="sdpa")
    model = BeitForMaskedImageModeling(config).to(device).train()
    tokenizer = DalleEncoder(p["tok_hidden"], p["tok_blocks"], p["vocab_size"]).to(device).eval()
    for q in tokenizer.parameters():
        q.requires_grad_(False)
    return model, tokenizer, p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(batch, args, device):
    model, tokenizer, p = build(args.preset, device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05,
                            fused=device.type == "cuda")
    grid = p["image_size"] // p["patch_size"]
    n = grid * grid
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(batch, 3, p["image_size"], p["image_size"], generator=gen).to(device)
    tok_images = torch.rand(batch, 3, p["tok_size"], p["tok_size"], generator=gen).to(device)
    mask = (torch.rand(batch, n, generator=gen) < 0.4).to(device)
    def masked_loss(images, mask, targets):
        hidden = model.beit(pixel_values=images, bool_masked_pos=mask).last_hidden_state
        logits = model.lm_head(model.layernorm(hidden[:, 1:][mask]))
        return F.cross_entropy(logits.float(), targets)

    # torch.compile (the second reference): compiled during the warmup steps.
    loss_fn = torch.compile(masked_loss) if args.compile else masked_loss
    timings = {"tokenizer": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = 0.0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            targets = tokenizer(0.8 * tok_images + 0.1).argmax(1).flatten(1)[mask]
        sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(images, mask, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if step >= args.warmup:
            timings["tokenizer"] += t1 - t0
            timings["forward_backward"] += t2 - t1
            timings["optimizer"] += t3 - t2
            total += t3 - t0
    per_step = total / args.steps
    result = {
        "impl": "pytorch-compile" if args.compile else "pytorch", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset, "dtype": args.dtype, "batch": batch, "images_per_s": batch / per_step,
        "step_ms": {k: 1e3 * v / args.steps for k, v in timings.items()},
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "torch": torch.__version__, "loss": float(loss),
    }
    if args.preset in GFLOP_PER_IMAGE:
        result["mfu"] = GFLOP_PER_IMAGE[args.preset] * 1e9 * batch / per_step / (args.peak_tflops * 1e12)
    print(json.dumps(result), flush=True)
    del model, tokenizer, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="64,128,256")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward and loss")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        try:
            bench(b, args, device)
        except torch.OutOfMemoryError:
            print(json.dumps({"impl": "pytorch", "batch": b, "error": "out of memory"}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
