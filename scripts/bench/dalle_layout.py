"""OpenAI's DALL-E dVAE layout (dall_e.Encoder / dall_e.Decoder) in plain PyTorch, generalised
to beit's tokenizer configs (numGroups, blocksPerGroup, hiddenSize, decoderInputSize): the
reference side of beit's tokenizer benchmarks. Our own transcription of the published layout,
not OpenAI's code."""
from collections import OrderedDict

import torch.nn as nn


class Conv(nn.Conv2d):
    """DALL-E's conv: "same" padding."""

    def __init__(self, n_in, n_out, k):
        super().__init__(n_in, n_out, k, padding=(k - 1) // 2)


class Block(nn.Module):
    """id path (1x1 when widths differ) + post_gain * 4 x (ReLU, conv), narrowing to n_out/4."""

    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [(n_in, n_hid), (n_hid, n_hid), (n_hid, n_hid), (n_hid, n_out)]
        layers = []
        for i, ((a, b), k) in enumerate(zip(widths, kernels)):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv(a, b, k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(n_in, widths, n_blk, n_layers, kernels, between):
    groups = []
    for g, width in enumerate(widths):
        blocks = [(f"block_{i + 1}", Block(n_in if i == 0 else width, width, n_layers, kernels)) for i in range(n_blk)]
        if g < len(widths) - 1:
            blocks.append(between())
        groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
        n_in = width
    return groups


class Encoder(nn.Module):
    """[B, C, H, W] mapped pixels -> [B, V, H/d, W/d] logits, d = 2^(groups-1)."""

    def __init__(self, channels, n_hid, groups, n_blk, vocab):
        super().__init__()
        widths = [n_hid * 2 ** g for g in range(groups)]
        body = _groups(n_hid, widths, n_blk, groups * n_blk, (3, 3, 3, 1), lambda: ("pool", nn.MaxPool2d(2)))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv(channels, n_hid, 7)), *body,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(widths[-1], vocab, 1))])))]))

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    """[B, V, h, w] (relaxed) one-hot codes -> [B, 2C, h*d, w*d] logit-Laplace (mu, log b)."""

    def __init__(self, channels, n_hid, groups, n_blk, vocab, n_init):
        super().__init__()
        widths = [n_hid * 2 ** (groups - 1 - g) for g in range(groups)]
        body = _groups(n_init, widths, n_blk, groups * n_blk, (1, 3, 3, 3),
                       lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv(vocab, n_init, 1)), *body,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(n_hid, 2 * channels, 1))])))]))

    def forward(self, z):
        return self.blocks(z)


def from_config(cfg):
    """Encoder and decoder of a beit `DvaeConfig` (camelCase dict)."""
    c, h, g, b, v = cfg["numChannels"], cfg["hiddenSize"], cfg["numGroups"], cfg["blocksPerGroup"], cfg["vocabSize"]
    return Encoder(c, h, g, b, v), Decoder(c, h, g, b, v, cfg["decoderInputSize"])
