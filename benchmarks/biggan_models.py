"""The models the BigGAN benchmarks run on: the seed config's optimizer settings,
BigGAN-128's (or, with --quick, a small BigGAN-32's) model configs and parameter shapes."""
from __future__ import annotations

from typing import Dict, List

import torch

from pygan_optim.models import BigGANDiscriminator, BigGANGenerator


SEED_HP = {"generator": dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6),
           "discriminator": dict(lr=4e-4, betas=(0.0, 0.999), eps=1e-6)}


def model_cfgs(quick: bool) -> Dict[str, dict]:
    scale, ch = (32, 16) if quick else (128, 96)
    common = dict(num_classes=1000, base_channels=ch, sn_eps=1e-6, init_type="ortho",
                  act_cfg=dict(type="ReLU", inplace=True))
    return {"generator": dict(common, output_scale=scale, noise_size=120, shared_dim=128,
                              with_shared_embedding=True, split_noise=True, auto_sync_bn=False),
            "discriminator": dict(common, input_scale=scale, with_spectral_norm=True)}


def real_shapes(quick: bool) -> Dict[str, List[torch.Size]]:
    cfgs = model_cfgs(quick)
    return {"generator": [p.shape for p in BigGANGenerator(**cfgs["generator"]).parameters()],
            "discriminator": [p.shape for p in BigGANDiscriminator(**cfgs["discriminator"]).parameters()]}
