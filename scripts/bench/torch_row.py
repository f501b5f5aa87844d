#!/usr/bin/env python3
"""The PyTorch eager side of `npm run bench:torch` and `npm run bench:scaling`: one row of
scripts/bench/rows.json, resolved by the orchestrator (src/bench/torch.ts, scaling.ts) into full
beit configs, run in its own process so its peak RSS is its own. Prints one JSON line: images/s
over the timed steps and peak RSS.

Started by torchrun (WORLD_SIZE set), it is PyTorch DDP on the gloo backend: each rank takes its
share of the row's batch, gradients are averaged by DDP's bucketed all-reduce, rank 0 prints.

With --compile the modules that compute the loss run under torch.compile (inductor; the
optimizer step stays eager), compiled during the warm-up steps, which are not timed.

With --count-flops it also counts one step's matmul and convolution FLOPs (forward and backward,
torch.utils.flop_counter), the work both sides do; with --roof it measures this machine's GEMM
roof instead (a large square f32 matmul, and bf16 where the CPU has bf16 GEMM units) on the
same threads.

The work is beit's: transformers' BEiT with the same config, the MIM head on the masked patches
only (as beit computes it), masked cross-entropy; BeitForSemanticSegmentation with its own loss; AdamW with BEiT's decay exemptions, global
norm clipping; the tokenizer is the DALL-E layout (dalle_layout.py) with the Gumbel-softmax
relaxation, logit-Laplace reconstruction, KL to the uniform prior, AdamW and a weight EMA.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dalle_layout  # noqa: E402


def hf_config(c, **extra):
    from transformers import BeitConfig
    return BeitConfig(
        image_size=tuple(c["imageSize"]), patch_size=c["patchSize"], num_channels=c["numChannels"],
        hidden_size=c["hiddenSize"], num_hidden_layers=c["numHiddenLayers"], num_attention_heads=c["numAttentionHeads"],
        intermediate_size=c["intermediateSize"], vocab_size=c["vocabSize"], layer_scale_init_value=c["layerScaleInitValue"],
        use_absolute_position_embeddings=c["useAbsolutePositionEmbeddings"],
        use_shared_relative_position_bias=c["useSharedRelativePositionBias"],
        use_relative_position_bias=c["useRelativePositionBias"], drop_path_rate=c["dropPathRate"],
        layer_norm_eps=c["layerNormEps"], initializer_range=c["initializerRange"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act="gelu", **extra)


EXEMPT = ("cls_token", "mask_token", "position_embeddings", "relative_position_bias_table")


def adamw(named, lr, weight_decay):
    """AdamW with beit's groups: no decay for 1-D tensors, biases, tokens and position tables."""
    decay, exempt = [], []
    for name, p in named:
        (exempt if p.ndim <= 1 or name.endswith(".bias") or name.endswith(EXEMPT) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    # fused: one kernel over all tensors, PyTorch's fastest AdamW on the CPU (the default is a
    # Python loop over them there).
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=FUSED)


FUSED = os.environ.get("BENCH_FUSED", "1") == "1"
CHANNELS_LAST = os.environ.get("BENCH_CHANNELS_LAST", "1") == "1"


def channels_last(*tensors_or_modules):
    """Convolutions in NHWC (oneDNN's fast layout on the CPU; beit's engine is NHWC throughout)."""
    if not CHANNELS_LAST:
        return tensors_or_modules
    return tuple(t.to(memory_format=torch.channels_last) for t in tensors_or_modules)


def images(gen, batch, c, h, w, lo, hi):
    return torch.rand(batch, c, h, w, generator=gen) * (hi - lo) + lo


class MimLoss(torch.nn.Module):
    """The MIM head on the masked patches only, as one module so DDP sees one forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels, mask, targets):
        hidden = self.model.beit(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state
        logits = self.model.lm_head(self.model.layernorm(hidden)[:, 1:][mask])
        return F.cross_entropy(logits, targets[mask])


def distributed(module):
    """`module` under DDP (gloo) when torchrun started this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module)


def share(row):
    """This rank's images of the row's batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return row["batchSize"] // world


def mim(row, gen, wrap):
    from transformers import BeitForMaskedImageModeling
    c = row["config"]
    model = BeitForMaskedImageModeling(hf_config(c, use_mask_token=True)).train()
    opt = adamw(model.named_parameters(), 1e-4, 0.05)
    loss_of = distributed(wrap(MimLoss(model)))
    b = share(row)
    grid = [s // c["patchSize"] for s in c["imageSize"]]
    n = grid[0] * grid[1]
    pixels = images(gen, b, c["numChannels"], *c["imageSize"], -1, 1)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n, generator=gen)[: max(1, round(row["maskRatio"] * n))]] = True
    targets = torch.randint(0, c["vocabSize"], (b, n), generator=gen)

    def step():
        loss = loss_of(pixels, mask, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        return loss.item()
    return step


def classifier(row, gen, wrap):
    from transformers import BeitForImageClassification
    c = row["config"]
    model = BeitForImageClassification(hf_config(c, num_labels=row["numLabels"], use_mean_pooling=True)).train()
    opt = adamw(model.named_parameters(), 1e-4, 0.05)
    forward = distributed(wrap(model))
    b = share(row)
    pixels = images(gen, b, c["numChannels"], *c["imageSize"], -1, 1)
    labels = torch.randint(0, row["numLabels"], (b,), generator=gen)

    def step():
        loss = F.cross_entropy(forward(pixel_values=pixels).logits, labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        return loss.item()
    return step


def segmenter(row, gen, wrap):
    from transformers import BeitForSemanticSegmentation
    s = row["segmenterConfig"]
    c = s["model"]
    model = BeitForSemanticSegmentation(hf_config(
        c, num_labels=s["numLabels"], out_indices=s["outIndices"], pool_scales=s["poolScales"],
        use_auxiliary_head=s["useAuxiliaryHead"], auxiliary_channels=s["auxiliaryChannels"],
        auxiliary_num_convs=s["auxiliaryNumConvs"], auxiliary_concat_input=s["auxiliaryConcatInput"],
        auxiliary_loss_weight=s["auxiliaryLossWeight"], semantic_loss_ignore_index=s["semanticLossIgnoreIndex"])).train()
    opt = adamw(model.named_parameters(), 1e-4, 0.05)
    b = share(row)
    model, pixels = channels_last(model, images(gen, b, c["numChannels"], *c["imageSize"], -1, 1))
    forward = wrap(model)
    labels = torch.randint(0, s["numLabels"], (b, *c["imageSize"]), generator=gen)

    def step():
        # transformers' loss: both heads' logits upsampled to the labels, cross-entropy, aux weighted.
        loss = forward(pixel_values=pixels, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        return loss.item()
    return step


EPS = 0.1  # DALL-E's logit-Laplace pixel map


def tokenizer_inputs(row, gen):
    cfg = row["tokenizerConfig"]
    s = row["imageSize"]
    x = images(gen, row["batchSize"], cfg["numChannels"], s, s, 0, 1) * (1 - 2 * EPS) + EPS
    return cfg, x


def tokenizer_train(row, gen, wrap):
    cfg, x = tokenizer_inputs(row, gen)
    encoder, decoder, x = channels_last(*dalle_layout.from_config(cfg), x)
    named = [(f"encoder.{n}", p) for n, p in encoder.named_parameters()] + \
            [(f"decoder.{n}", p) for n, p in decoder.named_parameters()]
    params = [p for _, p in named]
    opt = adamw(named, 1e-4, 1e-4)
    ema = [p.detach().clone() for p in params]
    encode, decode = wrap(encoder), wrap(decoder)
    c, v = cfg["numChannels"], cfg["vocabSize"]
    d = 2 ** (cfg["numGroups"] - 1)
    temperature, kl_weight = 1.0, 1.0

    def step():
        logits = encode(x)
        u = torch.rand(logits.shape, generator=gen).clamp_min(1e-20)
        soft = torch.softmax((logits - torch.log(-torch.log(u))) / temperature, dim=1)
        out = decode(soft)
        mu, log_b = out[:, :c], out[:, c:]
        logit_x = torch.log(x) - torch.log1p(-x)
        nll = log_b + torch.log(x) + torch.log1p(-x) + (logit_x - mu).abs() * torch.exp(-log_b) + math.log(2)
        log_q = torch.log_softmax(logits, dim=1)
        kl = (log_q.exp() * log_q).sum(1).mean() + math.log(v)
        loss = nll.mean() + kl * (kl_weight / (c * d * d))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.999)
            codes = logits.argmax(1)
        return loss.item() + 0 * codes.numel()
    return step


def tokenizer_encode(row, gen, wrap):
    cfg, x = tokenizer_inputs(row, gen)
    encoder, _ = dalle_layout.from_config(cfg)
    encoder, x = channels_last(encoder, x)
    encode = wrap(encoder.eval())

    def step():
        with torch.no_grad():
            return encode(x).argmax(1).sum().item()
    return step


KINDS = {"mim": mim, "classifier": classifier, "segmenter": segmenter, "tokenizer-train": tokenizer_train, "tokenizer-encode": tokenizer_encode}


ROOF_SIZE = 2048


def gemm_roof(dtype, repeats=10):
    """GFLOP/s of the best of `repeats` ROOF_SIZE^3 matmuls in `dtype` (after one warm-up)."""
    a = torch.randn(ROOF_SIZE, ROOF_SIZE).to(dtype)
    b = torch.randn(ROOF_SIZE, ROOF_SIZE).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * ROOF_SIZE ** 3 / best / 1e9


def resident_mib():
    """This process's resident set now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def step_flops(step):
    """Matmul and convolution FLOPs of one call of `step`, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--roof", action="store_true", help="measure the GEMM roof (f32, and bf16 with --bf16) and exit")
    p.add_argument("--bf16", action="store_true", help="with --roof: the bf16 roof too")
    p.add_argument("--count-flops", action="store_true", help="count one step's FLOPs after the timed steps")
    p.add_argument("--row", help="the resolved row, as JSON")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="bf16: every step under torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--compile", action="store_true",
                   help="the loss's modules under torch.compile (compiled in the warm-up steps)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.roof:
        roof = {"f32": gemm_roof(torch.float32)}
        if args.bf16:
            roof["bf16"] = gemm_roof(torch.bfloat16)
        print(json.dumps({"gflops": roof, "size": ROOF_SIZE, "version": f"torch {torch.__version__}"}))
        return
    if args.row is None or args.steps is None:
        p.error("--row and --steps are required (or --roof)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    row = json.loads(args.row)
    if world > 1 and row["kind"] not in ("mim", "classifier"):
        raise SystemExit(f"{row['kind']} is not a data-parallel row")
    wrap = torch.compile if args.compile else (lambda module: module)
    if row["kind"] in ("mim", "classifier", "segmenter"):
        import transformers.models.beit.modeling_beit  # noqa: F401 (the runtime, before the row's work)
    start_rss = resident_mib()
    f32_step = KINDS[row["kind"]](row, torch.Generator().manual_seed(rank), wrap)

    def step():
        if args.autocast == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return f32_step()
        return f32_step()

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - started
    flops = step_flops(step) if args.count_flops else None
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank > 0:
        return
    ranks = f"DDP gloo {world} ranks x " if world > 1 else ""
    print(json.dumps({
        "imagesPerSecond": args.steps * row["batchSize"] / seconds,
        "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "startRssMiB": start_rss,
        "version": f"torch {torch.__version__}, {ranks}{torch.get_num_threads()} threads"
                   + (", bf16 autocast" if args.autocast == "bf16" else "")
                   + (", torch.compile" if args.compile else ""),
        **({"flopsPerStep": flops} if flops is not None else {}),
    }))


if __name__ == "__main__":
    main()
