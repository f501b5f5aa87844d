#!/usr/bin/env python3
"""The other half of the parity proof, run by hand after `npm run build` (and
make_fixtures.py), in the same Python environment:

    python scripts/interop/check_roundtrip.py

1. Every transformers fixture goes through the beit CLI: `beit import` (with a resolution
   change for mim-resize, a new head for model-pooler), then `beit export`; transformers'
   `from_pretrained` loads the exported folder and its outputs are compared with the
   fixture's reference outputs (max abs difference printed, 1e-4 required).
2. A release-size DALL-E dVAE (random weights: OpenAI's files cannot be downloaded here) is
   pickled as OpenAI ships it, converted with convert_dalle.py, loaded as beit's `dall-e`
   tokenizer through the Node API, and its token ids and reconstructions compared.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import BeitForImageClassification, BeitForMaskedImageModeling
from transformers.models.beit import modeling_beit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
FIXTURES = os.path.join(ROOT, "crate", "core", "tests", "fixtures")
sys.path.insert(0, HERE)
from convert_dalle import convert  # noqa: E402
from make_fixtures import direct_relative_position_bias  # noqa: E402

CLI = ["node", os.path.join(ROOT, "dist", "cli.js")]
TOLERANCE = 1e-4
failures = []


def report(what, ours, reference):
    diff = (ours - reference).abs().max().item()
    ok = diff < TOLERANCE
    print(f"  {what}: max abs diff {diff:.2e} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(what)


def beit(*args):
    subprocess.run(CLI + list(args) + ["--quiet"], check=True)


def beit_roundtrip(tmp):
    cases = {
        "mim-shared": [], "mim-abs-gray": [], "mim-resize": ["--image-size", "20"],
        "cls-mean-nonsquare": [], "cls-token-abs": [], "model-pooler": ["--num-labels", "4"],
    }
    original = modeling_beit.BeitRelativePositionBias.forward
    for name, extra in cases.items():
        src = os.path.join(FIXTURES, "hf", name)
        ckpt, out = os.path.join(tmp, f"{name}.safetensors"), os.path.join(tmp, name)
        beit("import", "--from", src, "--out", ckpt, *extra)
        beit("export", "--from", ckpt, "--out", out)
        config = json.load(open(os.path.join(out, "config.json")))
        cls = BeitForMaskedImageModeling if config["architectures"] == ["BeitForMaskedImageModeling"] else BeitForImageClassification
        # Same patch as the fixtures: transformers scrambles non-square relative tables.
        size = config["image_size"]
        square = not isinstance(size, list) or size[0] == size[1]
        modeling_beit.BeitRelativePositionBias.forward = original if square else direct_relative_position_bias
        model = cls.from_pretrained(out).eval()
        io = load_file(os.path.join(src, "io.safetensors"))
        kwargs = dict(output_hidden_states=True)
        if "bool_masked_pos" in io:
            kwargs["bool_masked_pos"] = io["bool_masked_pos"].bool()
        with torch.no_grad():
            result = model(pixel_values=io["pixel_values"], **kwargs)
        print(f"{name} -> {cls.__name__} ({out})")
        report(f"{name} last hidden state", result.hidden_states[-1], io["last_hidden_state"])
        if "logits" in io:
            report(f"{name} logits", result.logits, io["logits"])
    modeling_beit.BeitRelativePositionBias.forward = original


NODE_DALLE = r"""
const { Dvae } = require(process.argv[1])
const fs = require('fs')
;(async () => {
  const dvae = await Dvae.load(process.argv[2])
  const pixels = new Float32Array(fs.readFileSync(process.argv[3]).buffer.slice(0))
  const ids = await dvae.encode(pixels, 2)
  const images = await dvae.decode(ids, 2)
  fs.writeFileSync(process.argv[4], Buffer.from(ids.buffer))
  fs.writeFileSync(process.argv[5], Buffer.from(images.buffer))
  console.log(JSON.stringify(dvae.config))
})()
"""


def dalle_release_size(tmp):
    from dall_e import map_pixels, unmap_pixels
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    enc, dec = Encoder(), Decoder()
    torch.save(enc, os.path.join(tmp, "encoder.pkl"))
    torch.save(dec, os.path.join(tmp, "decoder.pkl"))
    path = os.path.join(tmp, "dall-e.safetensors")
    convert(os.path.join(tmp, "encoder.pkl"), os.path.join(tmp, "decoder.pkl"), path)
    pixels = torch.rand(2, 3, 112, 112, generator=gen)
    pixels.numpy().astype("float32").tofile(os.path.join(tmp, "pixels.f32"))
    out = subprocess.run(["node", "-e", NODE_DALLE, os.path.join(ROOT, "dist", "index.js"), path,
                          os.path.join(tmp, "pixels.f32"), os.path.join(tmp, "ids.i32"), os.path.join(tmp, "images.f32")],
                         check=True, capture_output=True, text=True).stdout
    print(f"dall-e (release size, random weights) loaded as {out.strip()}")
    ours_ids = torch.from_file(os.path.join(tmp, "ids.i32"), size=2 * 14 * 14, dtype=torch.int32).view(2, 14, 14)
    ours_images = torch.from_file(os.path.join(tmp, "images.f32"), size=2 * 3 * 112 * 112, dtype=torch.float32).view(2, 3, 112, 112)
    with torch.no_grad():
        logits = enc(map_pixels(pixels))
        ids = logits.argmax(1)
        one_hot = torch.nn.functional.one_hot(ids, 8192).permute(0, 3, 1, 2).float()
        images = unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
    same = (ours_ids == ids).float().mean().item()
    top2 = logits.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    print(f"  token ids equal at {same * 100:.1f}% of {ids.numel()} positions (smallest top-2 logit margin {margin:.2e})")
    if same < 1.0:
        failures.append("dall-e ids")
    report("dall-e reconstruction", ours_images, images)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        beit_roundtrip(tmp)
        dalle_release_size(tmp)
    if failures:
        sys.exit(f"FAILED: {', '.join(failures)}")
    print("all round trips within 1e-4")


if __name__ == "__main__":
    main()
