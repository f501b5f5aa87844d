#!/usr/bin/env python3
"""Build the semantic-segmentation parity fixtures: small random-weight
`BeitForSemanticSegmentation` models from transformers, their inputs, outputs and a training
trajectory.

    npm run setup:bench-venv   # or any venv with torch, transformers and safetensors
    python scripts/interop/make_segmentation_fixtures.py   # writes crate/core/tests/fixtures/hf/seg-*

Each fixture is a transformers folder (config.json + model.safetensors, as `save_pretrained`
writes it) plus io.safetensors:
- pixel_values, labels (255 = ignore on ~10% of the pixels);
- logits, auxiliary_logits (evaluation mode, NCHW) and loss (evaluation mode);
- for `seg-shared-aux`, a 20-step training trajectory from the saved weights: batches
  train_pixels [20, B, C, H, W] / train_labels, plain SGD (lr 0.05) on the mean loss, the loss
  of every step (train_losses) and every BatchNorm's running statistics after the last step
  (`after.<norm>.running_mean` / `running_var`). SGD, not AdamW: the biases that feed a
  BatchNorm (fpn1.0, fpn1.3, fpn2.0) have a zero gradient in training by construction, and
  Adam turns their round-off into full-size steps of random sign, so two correct
  implementations part ways there (AdamW itself is compared with PyTorch in beit's own tests).

Every weight is random, BatchNorm running statistics included, so evaluation mode reads them.
The non-square case uses the direct relative-position lookup (see make_fixtures.py).
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForSemanticSegmentation
from transformers.models.beit import modeling_beit

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import ROOT, SMALL, direct_relative_position_bias, randomise  # noqa: E402

# name: (config overrides, training trajectory)
CASES = {
    "seg-shared-aux": (dict(image_size=16, num_hidden_layers=4, out_indices=[1, 2, 3, 4],
        use_shared_relative_position_bias=True, layer_scale_init_value=0.1, layer_norm_eps=1e-6,
        auxiliary_channels=16, num_labels=5), True),
    "seg-nonsquare-concat": (dict(image_size=[16, 24], num_hidden_layers=5, out_indices=[2, 3, 4, 5],
        use_relative_position_bias=True, layer_scale_init_value=0.1, layer_norm_eps=1e-6,
        auxiliary_channels=8, auxiliary_num_convs=2, auxiliary_concat_input=True, num_labels=4), False),
    "seg-noaux": (dict(image_size=16, num_hidden_layers=5, out_indices=[1, 2, 4, 5],
        use_relative_position_bias=True, layer_scale_init_value=0.0, layer_norm_eps=1e-12,
        use_auxiliary_head=False, pool_scales=[1, 3], num_labels=3), False),
}

STEPS = 20
BATCH = 2
LR = 0.05


def randomise_norm_statistics(model, gen):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def random_labels(shape, num_labels, gen):
    labels = torch.randint(0, num_labels, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.1] = 255
    return labels


def saved_running_stats(model):
    """The BatchNorm running statistics under the checkpoint keys save_pretrained writes
    (transformers 5.x renames its modules internally and maps them back on saving)."""
    import tempfile
    from safetensors.torch import load_file
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        saved = load_file(os.path.join(tmp, "model.safetensors"))
    return {k: v for k, v in saved.items() if k.endswith((".running_mean", ".running_var"))}


def trajectory(model, folder, config, gen, io):
    h, w = config.image_size if isinstance(config.image_size, list) else (config.image_size,) * 2
    pixels = torch.randn(STEPS, BATCH, config.num_channels, h, w, generator=gen)
    labels = random_labels((STEPS, BATCH, h, w), config.num_labels, gen)
    # Reload what was saved, so the trajectory starts from the checkpoint beit reads.
    model = BeitForSemanticSegmentation.from_pretrained(folder).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        out = model(pixel_values=pixels[step], labels=labels[step])
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    io["train_pixels"] = pixels
    io["train_labels"] = labels.to(torch.int32)
    io["train_losses"] = torch.tensor(losses)
    for name, value in saved_running_stats(model).items():
        io[f"after.{name}"] = value
    print(f"  trajectory: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def case(name, overrides, with_trajectory, gen):
    config = BeitConfig(**{**SMALL, **overrides})
    model = BeitForSemanticSegmentation(config).eval()
    randomise(model, gen)
    randomise_norm_statistics(model, gen)
    h, w = config.image_size if isinstance(config.image_size, list) else (config.image_size,) * 2
    pixels = torch.randn(BATCH, config.num_channels, h, w, generator=gen)
    labels = random_labels((BATCH, h, w), config.num_labels, gen)
    with torch.no_grad():
        out = model(pixel_values=pixels, labels=labels)
        aux = model.auxiliary_head(model.fpn(tuple(
            s[:, 1:].transpose(1, 2).reshape(BATCH, -1, h // config.patch_size, w // config.patch_size)
            for s in (model.beit(pixels, output_hidden_states=True).hidden_states[i - 1] for i in config.out_indices)
        ))) if config.use_auxiliary_head else None
    io = {"pixel_values": pixels, "labels": labels.to(torch.int32), "logits": out.logits, "loss": out.loss.reshape(1)}
    if aux is not None:
        io["auxiliary_logits"] = aux
    folder = os.path.join(ROOT, "hf", name)
    model.save_pretrained(folder, safe_serialization=True)
    print(f"{name}: grid {h // config.patch_size}x{w // config.patch_size}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, loss {out.loss.item():.4f}")
    if with_trajectory:
        trajectory(model, folder, config, gen, io)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(folder, "io.safetensors"))


def main():
    gen = torch.Generator().manual_seed(0)
    original = modeling_beit.BeitRelativePositionBias.forward
    for name, (overrides, with_trajectory) in CASES.items():
        size = overrides["image_size"]
        square = not isinstance(size, list) or size[0] == size[1]
        modeling_beit.BeitRelativePositionBias.forward = original if square else direct_relative_position_bias
        case(name, overrides, with_trajectory, gen)
    modeling_beit.BeitRelativePositionBias.forward = original


if __name__ == "__main__":
    main()
