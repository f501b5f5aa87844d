#!/usr/bin/env python3
"""Build the interop parity fixtures: small random-weight models from the reference
implementations (transformers' BEiT, OpenAI's DALL-E package), their inputs and outputs.

    python -m venv .venv && . .venv/bin/activate
    pip install torch transformers safetensors DALL-E attrs requests blobfile
    python scripts/interop/make_fixtures.py            # writes crate/core/tests/fixtures/

Each BEiT fixture is a transformers folder (config.json + model.safetensors, as
`save_pretrained` writes it) plus io.safetensors with the inputs and the reference outputs.
The DALL-E fixture goes through the same path as a user's: the modules are pickled as OpenAI
ships them, then converted by convert_dalle.py. `cargo test --test interop` compares.

Non-square grids: transformers (checked with 5.x) resamples the relative position table
on every call and reshapes it as (2w-1, 2h-1) instead of (2h-1, 2w-1), which scrambles it
whenever h != w. beit follows the reference implementations (unilm, timm), which index the
table directly; for the non-square fixture the reference outputs are computed with that direct
lookup patched into transformers (the patch is checked to change nothing on square grids).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, BeitModel
from transformers.models.beit import modeling_beit

sys.path.insert(0, os.path.dirname(__file__))
from convert_dalle import convert  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crate", "core", "tests", "fixtures")

SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    patch_size=4, vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
)

# name: (model class, config overrides, input size to evaluate at or None)
BEIT_CASES = {
    "mim-shared": (BeitForMaskedImageModeling, dict(image_size=16, num_channels=3, use_mask_token=True,
        use_shared_relative_position_bias=True, layer_scale_init_value=0.1, layer_norm_eps=1e-6), None),
    "mim-abs-gray": (BeitForMaskedImageModeling, dict(image_size=12, num_channels=1, use_mask_token=True,
        use_absolute_position_embeddings=True, use_relative_position_bias=True,
        layer_scale_init_value=0.0, layer_norm_eps=1e-12), None),
    "cls-mean-nonsquare": (BeitForImageClassification, dict(image_size=[8, 16], num_channels=3,
        use_relative_position_bias=True, use_mean_pooling=True, layer_norm_eps=1e-6,
        id2label={0: "a", 1: "b", 2: "c"}), None),
    "cls-token-abs": (BeitForImageClassification, dict(image_size=12, num_channels=3,
        use_absolute_position_embeddings=True, use_mean_pooling=False, layer_norm_eps=1e-6,
        id2label={i: f"class{i}" for i in range(5)}), None),
    "model-pooler": (BeitModel, dict(image_size=16, num_channels=3, use_shared_relative_position_bias=True,
        use_mean_pooling=True, layer_norm_eps=1e-6), None),
    # Loaded at 20x20 (5x5 patches) from a 12x12 (3x3) checkpoint; transformers interpolates
    # on the fly (interpolate_pos_encoding=True), beit resizes the tables on import.
    "mim-resize": (BeitForMaskedImageModeling, dict(image_size=12, num_channels=3, use_mask_token=True,
        use_absolute_position_embeddings=True, use_relative_position_bias=True, layer_norm_eps=1e-6), 20),
}


def direct_relative_position_bias(self, window_size, interpolate_pos_encoding=False, dim_size=None):
    """unilm/timm: the table indexed directly (valid when window_size is the native grid)."""
    assert tuple(window_size) == tuple(self.window_size), "direct lookup is for the native grid"
    index = self.generate_relative_position_index(tuple(window_size))
    n = window_size[0] * window_size[1] + 1
    bias = self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
    return bias.unsqueeze(0)


def randomise(model, gen):
    """Every parameter random (tables and LayerScale included, which init to constants)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def beit_case(name, cls, overrides, eval_size, gen):
    config = BeitConfig(**SMALL, **overrides)
    model = cls(config).eval()
    randomise(model, gen)
    h, w = config.image_size if isinstance(config.image_size, list) else (config.image_size,) * 2
    if eval_size:
        h = w = eval_size
    gh, gw = h // config.patch_size, w // config.patch_size
    pixels = torch.randn(2, config.num_channels, h, w, generator=gen)
    kwargs = dict(output_hidden_states=True)
    if eval_size:
        kwargs["interpolate_pos_encoding"] = True
    io = {"pixel_values": pixels}
    if cls is BeitForMaskedImageModeling:
        mask = torch.rand(2, gh * gw, generator=gen) < 0.4
        mask[:, 0] = True
        io["bool_masked_pos"] = mask.to(torch.uint8)
        kwargs["bool_masked_pos"] = mask
    with torch.no_grad():
        out = model(pixel_values=pixels, **kwargs)
    io["last_hidden_state"] = out.hidden_states[-1]
    if cls is BeitForMaskedImageModeling:
        io["logits"] = out.logits
    elif cls is BeitForImageClassification:
        io["logits"] = out.logits
    else:
        io["pooler_output"] = out.pooler_output
    folder = os.path.join(ROOT, "hf", name)
    model.save_pretrained(folder, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(folder, "io.safetensors"))
    print(f"{name}: {cls.__name__}, grid {gh}x{gw}, {sum(p.numel() for p in model.parameters())} parameters")


def dalle_case(gen):
    import attr
    from dall_e import map_pixels
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder
    # The package's validators require release-sized widths (n_hid >= 64, 512+ codes); the
    # code paths are the same at any width, so a fixture-sized model turns them off.
    attr.validators.set_disabled(True)
    enc = Encoder(n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=32)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, output_channels=3, vocab_size=32)
    attr.validators.set_disabled(False)
    with torch.no_grad():
        for p in list(enc.parameters()) + list(dec.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = os.path.join(ROOT, "dalle")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "tmp")
    os.makedirs(tmp, exist_ok=True)
    torch.save(enc, os.path.join(tmp, "encoder.pkl"))
    torch.save(dec, os.path.join(tmp, "decoder.pkl"))
    convert(os.path.join(tmp, "encoder.pkl"), os.path.join(tmp, "decoder.pkl"),
            os.path.join(folder, "dvae.safetensors"), image_size=16)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    pixels = torch.rand(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        logits = enc(map_pixels(pixels))
        ids = logits.argmax(1)
        one_hot = torch.nn.functional.one_hot(ids, 32).permute(0, 3, 1, 2).float()
        decoded = dec(one_hot)
    save_file({"pixels": pixels, "logits": logits.contiguous(), "ids": ids.to(torch.int32),
               "decoded": decoded.contiguous()}, os.path.join(folder, "io.safetensors"))
    print(f"dalle: encoder {sum(p.numel() for p in enc.parameters())}, decoder "
          f"{sum(p.numel() for p in dec.parameters())} parameters")


def check_patch_on_square(gen):
    config = BeitConfig(**SMALL, image_size=16, use_relative_position_bias=True)
    rpb = modeling_beit.BeitRelativePositionBias(config)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_(generator=gen)
        a = rpb((4, 4))
        b = direct_relative_position_bias(rpb, (4, 4))
    assert torch.equal(a, b), "the direct lookup must equal transformers' bias on a square grid"


def main():
    gen = torch.Generator().manual_seed(0)
    check_patch_on_square(gen)
    original = modeling_beit.BeitRelativePositionBias.forward
    for name, (cls, overrides, eval_size) in BEIT_CASES.items():
        size = overrides["image_size"]
        square = not isinstance(size, list) or size[0] == size[1]
        modeling_beit.BeitRelativePositionBias.forward = original if square else direct_relative_position_bias
        beit_case(name, cls, overrides, eval_size, gen)
    modeling_beit.BeitRelativePositionBias.forward = original
    dalle_case(gen)
    import transformers
    import dall_e  # noqa: F401
    with open(os.path.join(ROOT, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "DALL-E": "0.1"}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
