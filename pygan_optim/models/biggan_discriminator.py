"""BigGAN discriminator (reference/mmengine_api.md sections 6.3-6.4)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .biggan_modules import (BigGANNet, DiscResBlock, SelfAttentionBlock, SNOptions,
                             build_activation)

# Per input scale: channel multipliers of base_channels for each block's input (the first block
# takes the image) and output, which blocks halve the resolution, and the blocks followed by
# self-attention.
_ARCHS = {
    32: ([4, 4, 4], [4, 4, 4, 4], [True, True, False, False], ()),
    64: ([1, 2, 4, 8], [1, 2, 4, 8, 16], [True] * 4 + [False], ()),
    128: ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True] * 5 + [False], (0,)),
    256: ([1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False], (1,)),
    512: ([1, 1, 2, 4, 8, 8, 16], [1, 1, 2, 4, 8, 8, 16, 16], [True] * 7 + [False], (3,)),
}


def default_discriminator_arch(input_scale: int, in_channels: int, base_channels: int) -> dict:
    """The standard BigGAN layout, in MMagic's ``arch_cfg`` format."""
    if input_scale not in _ARCHS:
        raise ValueError(f"input_scale must be one of {sorted(_ARCHS)}, got {input_scale}")
    ins, outs, down, attn = _ARCHS[input_scale]
    return dict(in_channels=[in_channels] + [base_channels * m for m in ins],
                out_channels=[base_channels * m for m in outs],
                downsample=list(down),
                attention=[i in attn for i in range(len(outs))])


class BigGANDiscriminator(BigGANNet):
    """BigGAN projection discriminator: image (and class) -> one logit per sample.

    Residual down-blocks (self-attention after the block producing 64x64 features at 128 px),
    then act -> sum over space -> linear, plus the projection term
    ``<proj_y(label), features>`` when ``num_classes > 0``. Spectral norm everywhere unless
    ``with_spectral_norm=False`` (buffers ``u0``/``sv0``, no extra parameters).

    Arguments follow MMagic's ``BigGANDiscriminator``; ``init_type`` (0.x spelling) and
    ``init_cfg`` are both accepted, as in :class:`BigGANGenerator`. See
    :class:`~pygan_optim.models.biggan_modules.DiscResBlock` for the one deliberate difference
    in the forward with ``act_cfg=dict(type='ReLU', inplace=True)``.
    """

    block_type = "BigGANDiscResBlock"

    def __init__(self,
                 input_scale: int,
                 num_classes: int = 0,
                 in_channels: int = 3,
                 out_channels: int = 1,
                 base_channels: int = 96,
                 sn_eps: float = 1e-6,
                 sn_style: str = "ajbrock",
                 act_cfg: dict = dict(type="ReLU"),
                 with_spectral_norm: bool = True,
                 blocks_cfg: dict = dict(type="BigGANDiscResBlock"),
                 arch_cfg: Optional[dict] = None,
                 init_type: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(blocks_cfg, init_type, init_cfg)
        self.num_classes = num_classes
        self.input_scale = input_scale
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.arch = (arch_cfg if arch_cfg
                     else default_discriminator_arch(input_scale, in_channels, base_channels))
        in_chs, out_chs = self.arch["in_channels"], self.arch["out_channels"]
        downsample = self.arch.get("downsample", [True] * len(out_chs))
        attention = self.arch.get("attention", [False] * len(out_chs))

        sn = SNOptions(enabled=with_spectral_norm, style=sn_style, eps=sn_eps)
        self.conv_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(in_chs, out_chs)):
            self.conv_blocks.append(DiscResBlock(cin, cout, sn, act_cfg,
                                                 with_downsample=downsample[i],
                                                 is_head_block=i == 0))
            if attention[i]:
                self.conv_blocks.append(SelfAttentionBlock(cout, sn))
        self.activate = build_activation(act_cfg)
        self.decision = sn.linear(out_chs[-1], out_channels)
        if num_classes > 0:
            self.proj_y = sn.embedding(num_classes, out_chs[-1])

        self._draw_initial_weights()

    def forward(self, x: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores images ``x`` (N, C, S, S); ``label`` (N,) is required when conditional.

        Returns (N, out_channels) logits.
        """
        h = x
        for block in self.conv_blocks:
            h = block(h)
        # Sum, not mean, over space: the logit scale then grows with resolution, as in BigGAN.
        h = torch.sum(self.activate(h), dim=[2, 3])
        out = self.decision(h)
        if self.num_classes > 0:
            if label is None:
                raise ValueError("a conditional discriminator (num_classes > 0) needs labels")
            proj = self.proj_y(label.reshape(-1).to(h.device))
            out = out + torch.sum(proj * h, dim=1, keepdim=True)
        return out
