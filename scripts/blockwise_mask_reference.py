#!/usr/bin/env python3
"""Reference statistics for BEiT's blockwise mask generator.

MaskingGenerator below is a faithful pure-Python port of microsoft/unilm
beit/masking_generator.py: the same control flow and the same sequence of draws
from `random`, with the numpy mask replaced by nested lists. It samples many
masks per configuration and writes summary statistics to
__test__/fixtures/blockwise-mask-reference.json, which __test__/masking.test.ts
compares our TypeScript BlockwiseMaskGenerator against.

Usage (from the repository root):  python3 scripts/blockwise_mask_reference.py
"""
import json
import math
import random
import re
import statistics
from pathlib import Path

NUM_MASKS = 20000
SEED = 20210615  # fixed so the fixture is reproducible

# Option names follow the TypeScript BlockwiseMaskOptions.
CONFIGS = [
    {"name": "beit-base-14x14", "height": 14, "width": 14, "numMaskingPatches": 75, "minNumPatches": 16},
    {"name": "small-8x8", "height": 8, "width": 8, "numMaskingPatches": 26, "minNumPatches": 4},
    {"name": "non-square-6x10", "height": 6, "width": 10, "numMaskingPatches": 24, "minNumPatches": 4, "minAspect": 0.3},
]

OUTPUT = Path(__file__).resolve().parent.parent / "__test__" / "fixtures" / "blockwise-mask-reference.json"


class MaskingGenerator:
    def __init__(self, rng, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.rng = rng
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size

        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches

        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)

                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                # Overlap
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1

                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = [[0] * self.width for _ in range(self.height)]
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)

            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta
        return mask


def count_components(mask):
    """Connected groups of masked cells, 4-connectivity."""
    height, width = len(mask), len(mask[0])
    seen = [[False] * width for _ in range(height)]
    components = 0
    for r in range(height):
        for c in range(width):
            if mask[r][c] and not seen[r][c]:
                components += 1
                seen[r][c] = True
                stack = [(r, c)]
                while stack:
                    i, j = stack.pop()
                    for ni, nj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                        if 0 <= ni < height and 0 <= nj < width and mask[ni][nj] and not seen[ni][nj]:
                            seen[ni][nj] = True
                            stack.append((ni, nj))
    return components


def summarize(config, rng):
    options = {k: v for k, v in config.items() if k != "name"}
    gen = MaskingGenerator(
        rng,
        (config["height"], config["width"]),
        config["numMaskingPatches"],
        min_num_patches=config["minNumPatches"],
        min_aspect=config.get("minAspect", 0.3),
    )
    counts, components = [], []
    cell_hits = [0] * (gen.height * gen.width)
    for _ in range(NUM_MASKS):
        mask = gen()
        flat = [v for row in mask for v in row]
        counts.append(sum(flat))
        components.append(count_components(mask))
        for k, v in enumerate(flat):
            cell_hits[k] += v
    histogram = {}
    for n in sorted(counts):
        histogram[str(n)] = histogram.get(str(n), 0) + 1
    return {
        "name": config["name"],
        "options": options,
        "meanCount": round(statistics.fmean(counts), 4),
        "stdCount": round(statistics.stdev(counts), 4),
        "countHistogram": histogram,
        "cellFrequency": [round(h / NUM_MASKS, 4) for h in cell_hits],
        "meanComponents": round(statistics.fmean(components), 4),
        "stdComponents": round(statistics.stdev(components), 4),
    }


def main():
    rng = random.Random(SEED)
    fixture = {
        "source": "scripts/blockwise_mask_reference.py (port of microsoft/unilm beit/masking_generator.py)",
        "seed": SEED,
        "numMasks": NUM_MASKS,
        "configs": [summarize(config, rng) for config in CONFIGS],
    }
    text = json.dumps(fixture, indent=2)
    # Keep numeric arrays on one line so the fixture stays short and diffable.
    text = re.sub(r"\[\s+([-0-9.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text + "\n")
    for summary in fixture["configs"]:
        print(f"{summary['name']}: mean count {summary['meanCount']} (std {summary['stdCount']}), "
              f"mean components {summary['meanComponents']}")


if __name__ == "__main__":
    main()
