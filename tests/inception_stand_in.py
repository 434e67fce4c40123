"""A stand-in for the FID Inception network, for the tests of what surrounds it (sampling, labels, statistics,
merging over processes, eval.json, sweep files): the real network reads 3-10 images/s on two CPU cores.

`stand_in_inception` takes the place of `fid.load_inception`: N x 3 x 299 x 299 in (x - 128) / 128 -> N x 2048, fixed
random projections of the 8 x 8 average-pooled image. Everything else (fid.InceptionFeatures' resize and scaling
included) is the real code; the network itself is tested in tests/test_evaluation.py.

A subprocess (tests/test_evaluation_conditional.py's two-process run) uses it through `python inception_stand_in.py
ddpm-hf-arguments...`: the `ddpm-hf` command with the stand-in in place.
"""

from __future__ import annotations

import sys

import torch


class StandInInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        projection = torch.randn(3 * 8 * 8, 2048, generator=torch.Generator().manual_seed(0)) / 8
        self.register_buffer("projection", projection)

    def forward(self, x):
        return torch.relu(torch.nn.functional.adaptive_avg_pool2d(x, 8).reshape(x.shape[0], -1) @ self.projection + 0.1)


def stand_in_inception(device="cpu"):
    return StandInInception().to(device)


if __name__ == "__main__":
    from ddpm_hf import fid
    from ddpm_hf.cli import main

    fid.load_inception = stand_in_inception
    sys.exit(main(sys.argv[1:]))
