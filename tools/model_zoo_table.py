#!/usr/bin/env python
"""Print the MODEL_ZOO.md variant table: parameters and multiply-adds counted with fvcore.

    python tools/model_zoo_table.py [--size 224]

fvcore counts one fused multiply-add as one "flop", so its totals are GMACs (the unit of the ResNeSt
paper's "GFLOPs"). Counted on the classification model (trunk + fc) at size x size, batch 1.
"""
import argparse
import logging

import torch
from fvcore.nn import FlopCountAnalysis

from resnest_backbone import VARIANTS, build_resnest


def count(variant: str, size: int):
    model = build_resnest(variant, num_classes=1000).eval()
    params = sum(p.numel() for p in model.parameters())

    class Classifier(torch.nn.Module):  # fvcore traces forward(); count the ImageNet classifier
        def __init__(self, trunk):
            super().__init__()
            self.trunk = trunk

        def forward(self, x):
            return self.trunk.classify(x)

    flops = FlopCountAnalysis(Classifier(model), torch.zeros(1, 3, size, size))
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return params / 1e6, flops.total() / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    print(f"| variant | blocks | radix | cardinality x width | stem | avd_first | params (M) | GMACs @{args.size} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v in VARIANTS.items():
        params, gmacs = count(name, args.size)
        print(f"| {name} | {'-'.join(map(str, v.layers))} | {v.radix} | {v.cardinality}x{v.bottleneck_width}d | "
              f"{v.stem_width} | {v.avd_first} | {params:.2f} | {gmacs:.2f} |")


if __name__ == "__main__":
    main()
