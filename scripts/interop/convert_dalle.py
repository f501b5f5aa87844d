#!/usr/bin/env python3
"""Convert OpenAI's DALL-E dVAE (encoder.pkl, decoder.pkl: pickled PyTorch modules from the
`DALL-E` package) into a beit tokenizer checkpoint (safetensors) that `Tokenizer.load` reads.

Run once, where PyTorch and the `DALL-E` package are installed (unpickling needs its classes):

    pip install torch DALL-E
    python scripts/interop/convert_dalle.py --encoder encoder.pkl --decoder decoder.pkl --out dall-e.safetensors

The module hyper-parameters (n_hid, blocks per group, vocabulary, ...) are read from the
pickled modules and written as the checkpoint's config; OpenAI's release is the `dall-e`
preset (112 px, 8192 codes).
"""
import argparse
import json

import torch
from safetensors.torch import save_file


def module_config(encoder, decoder, image_size):
    pairs = [
        ("group_count", encoder.group_count, decoder.group_count),
        ("n_hid", encoder.n_hid, decoder.n_hid),
        ("n_blk_per_group", encoder.n_blk_per_group, decoder.n_blk_per_group),
        ("input/output channels", encoder.input_channels, decoder.output_channels),
        ("vocab_size", encoder.vocab_size, decoder.vocab_size),
    ]
    for name, e, d in pairs:
        if e != d:
            raise SystemExit(f"encoder and decoder disagree on {name}: {e} vs {d}")
    downsample = 2 ** (encoder.group_count - 1)
    if image_size % downsample:
        raise SystemExit(f"--image-size {image_size} must be a multiple of {downsample}")
    return {
        "imageSize": [image_size, image_size],
        "numChannels": encoder.input_channels,
        "hiddenSize": encoder.n_hid,
        "numGroups": encoder.group_count,
        "blocksPerGroup": encoder.n_blk_per_group,
        "vocabSize": encoder.vocab_size,
        "decoderInputSize": decoder.n_init,
    }


def convert(encoder_path, decoder_path, out_path, image_size=112):
    encoder = torch.load(encoder_path, map_location="cpu", weights_only=False)
    decoder = torch.load(decoder_path, map_location="cpu", weights_only=False)
    config = module_config(encoder, decoder, image_size)
    tensors = {}
    for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
        for name, t in module.state_dict().items():
            tensors[prefix + name] = t.detach().to(torch.float32).contiguous()
    metadata = {
        "format": "beit-dvae/1",
        "config": json.dumps(config),
        # Converted weights are final: no EMA to keep, no optimizer state (step 0).
        "training": json.dumps({"emaDecay": 0}),
        "step": "0",
    }
    save_file(tensors, out_path, metadata=metadata)
    return config


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", required=True, help="encoder.pkl")
    p.add_argument("--decoder", required=True, help="decoder.pkl")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--image-size", type=int, default=112, help="default input size (DALL-E: 112)")
    a = p.parse_args()
    config = convert(a.encoder, a.decoder, a.out, a.image_size)
    print(f"wrote {a.out}: {json.dumps(config)}")


if __name__ == "__main__":
    main()
