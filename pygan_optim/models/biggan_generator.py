"""BigGAN generator (reference/mmengine_api.md sections 6.3-6.4)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .biggan_modules import (BigGANNet, GenResBlock, OutputLayer, SelfAttentionBlock,
                             SNOptions)

# Per output scale: channel multipliers of base_channels for each block's input and output, and
# the blocks followed by self-attention (the one producing 64x64 features). Every block doubles
# the resolution, starting from 4x4.
_ARCHS = {
    32: ([4, 4, 4], [4, 4, 4], ()),
    64: ([16, 16, 8, 4], [16, 8, 4, 2], (3,)),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1], (3,)),
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1], (3,)),
    512: ([16, 16, 8, 8, 4, 2, 1], [16, 8, 8, 4, 2, 1, 1], (3,)),
}

NoiseSource = Union[torch.Tensor, Callable[[tuple], torch.Tensor], None]


def default_generator_arch(output_scale: int, base_channels: int) -> dict:
    """The standard BigGAN layout, in MMagic's ``arch_cfg`` format."""
    if output_scale not in _ARCHS:
        raise ValueError(f"output_scale must be one of {sorted(_ARCHS)}, got {output_scale}")
    ins, outs, attn = _ARCHS[output_scale]
    return dict(in_channels=[base_channels * m for m in ins],
                out_channels=[base_channels * m for m in outs],
                upsample=[True] * len(ins),
                attention=[i in attn for i in range(len(ins))])


class BigGANGenerator(BigGANNet):
    """BigGAN generator: noise (and class) -> image in [-1, 1].

    A linear layer maps the first noise chunk to a 4x4 feature map; residual up-blocks follow,
    each conditioned through its batch norms on ``[shared_embedding(label), noise chunk i]``
    (``split_noise``), with self-attention at 64x64 (scales >= 64); a BN-act-conv-tanh head
    produces the image. Every conv/linear layer is spectrally normalised (buffers ``u0``/``sv0``,
    no extra parameters) unless ``with_spectral_norm=False``.

    Arguments follow MMagic's ``BigGANGenerator``. Initialisation accepts both spellings,
    ``init_type='ortho'`` (MMGeneration 0.x) and ``init_cfg=dict(type='ortho')`` (MMagic), with
    'ortho' | 'N02' | 'xavier', or ``init_cfg=dict(type='Pretrained', checkpoint=...)`` loaded by
    ``init_weights()``. Weights are initialised at construction, so ``init_weights()`` (which an
    MMEngine Runner calls) does not re-draw them unless asked directly.

    Differences from MMagic, on purpose: an unconditional model with the default
    ``with_shared_embedding=True`` raises ValueError instead of failing an assert; with ``noise``
    given and ``label=None``, labels are drawn for the noise's batch size instead of requiring
    ``num_batches``.
    """

    block_type = "BigGANGenResBlock"

    def __init__(self,
                 output_scale: int,
                 noise_size: int = 120,
                 num_classes: int = 0,
                 out_channels: int = 3,
                 base_channels: int = 96,
                 input_scale: int = 4,
                 with_shared_embedding: bool = True,
                 shared_dim: int = 128,
                 sn_eps: float = 1e-6,
                 sn_style: str = "ajbrock",
                 split_noise: bool = True,
                 act_cfg: dict = dict(type="ReLU"),
                 upsample_cfg: Optional[dict] = dict(type="nearest", scale_factor=2),
                 with_spectral_norm: bool = True,
                 auto_sync_bn: bool = True,
                 blocks_cfg: dict = dict(type="BigGANGenResBlock"),
                 arch_cfg: Optional[dict] = None,
                 out_norm_cfg: Optional[dict] = dict(type="BN"),
                 rgb2bgr: bool = False,
                 init_type: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(blocks_cfg, init_type, init_cfg)
        if num_classes == 0 and with_shared_embedding:
            raise ValueError("an unconditional generator (num_classes=0) has no class embedding:"
                             " pass with_shared_embedding=False")
        if num_classes > 0 and not with_shared_embedding and split_noise:
            raise ValueError("without a shared embedding the batch norms take the raw label, "
                             "so split_noise must be False")

        self.num_classes = num_classes
        self.output_scale = output_scale
        self.input_scale = input_scale
        self.shared_dim = shared_dim
        self.with_shared_embedding = with_shared_embedding
        self.split_noise = split_noise
        self.rgb2bgr = rgb2bgr
        self.arch = arch_cfg if arch_cfg else default_generator_arch(output_scale, base_channels)
        in_chs, out_chs = self.arch["in_channels"], self.arch["out_channels"]
        upsample = self.arch.get("upsample", [True] * len(in_chs))
        attention = self.arch.get("attention", [False] * len(in_chs))
        self._check_output_scale(upsample, upsample_cfg)

        # split_noise: one chunk for the first linear layer and one per residual block. The
        # noise size is rounded down to a multiple of the chunk count (120 -> 6 x 20 at 128 px).
        self.num_slots = len(in_chs) + 1 if split_noise else 1
        self.noise_chunk_size = noise_size // self.num_slots if split_noise else 0
        self.noise_size = noise_size // self.num_slots * self.num_slots

        if num_classes > 0:
            # Without a shared embedding the batch norms embed the raw label themselves.
            cond_dim = shared_dim + self.noise_chunk_size if with_shared_embedding else num_classes
        else:
            cond_dim = self.noise_chunk_size
        self.dim_after_concat = cond_dim

        sn = SNOptions(enabled=with_spectral_norm, style=sn_style, eps=sn_eps)
        self.noise2feat = sn.linear(self.noise_size // self.num_slots,
                                    in_chs[0] * input_scale ** 2)
        self.shared_embedding = (nn.Embedding(num_classes, shared_dim) if with_shared_embedding
                                 else nn.Identity())

        self.conv_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(in_chs, out_chs)):
            self.conv_blocks.append(GenResBlock(
                cin, cout, cond_dim, sn, act_cfg, upsample_cfg if upsample[i] else None,
                input_is_label=num_classes > 0 and not with_shared_embedding,
                auto_sync_bn=auto_sync_bn))
            if attention[i]:
                self.conv_blocks.append(SelfAttentionBlock(cout, sn))

        self.output_layer = OutputLayer(out_chs[-1], out_channels, sn, act_cfg, out_norm_cfg)

        self._draw_initial_weights()

    def _check_output_scale(self, upsample: list, upsample_cfg: Optional[dict]) -> None:
        factor = upsample_cfg.get("scale_factor", 2) if upsample_cfg else 1
        produced = self.input_scale * factor ** sum(bool(u) for u in upsample)
        if produced != self.output_scale:
            raise ValueError(f"the architecture produces {produced}x{produced} images from "
                             f"{self.input_scale}x{self.input_scale} features, but "
                             f"output_scale={self.output_scale}")

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _noise_batch(self, noise: NoiseSource, num_batches: int) -> torch.Tensor:
        if isinstance(noise, torch.Tensor):
            if noise.ndim != 2 or noise.size(1) != self.noise_size:
                raise ValueError(f"noise must have shape (N, {self.noise_size}), "
                                 f"got {tuple(noise.shape)}")
            return noise
        if num_batches <= 0:
            raise ValueError("num_batches must be > 0 when noise is not a tensor")
        if callable(noise):
            return noise((num_batches, self.noise_size))
        # Drawn on the CPU, so a seed gives the same noise on every device.
        return torch.randn((num_batches, self.noise_size))

    def _label_batch(self, label, num_batches: int, outside_embedding: bool):
        if self.num_classes == 0:
            return None
        if isinstance(label, torch.Tensor):
            if not outside_embedding:
                if label.ndim > 1 and all(s == 1 for s in label.shape[1:]):
                    label = label.view(-1)
                if label.ndim != 1:
                    raise ValueError(f"label must have shape (N,), got {tuple(label.shape)}")
            if label.size(0) != num_batches:
                raise ValueError(f"{label.size(0)} labels for {num_batches} noise vectors")
            return label
        if callable(label):
            return label((num_batches,))
        return torch.randint(0, self.num_classes, (num_batches,))

    def forward(self,
                noise: NoiseSource = None,
                label: Union[torch.Tensor, Callable, None] = None,
                num_batches: int = 0,
                return_noise: bool = False,
                truncation: float = -1.0,
                use_outside_embedding: bool = False):
        """Generates images.

        Args:
            noise: (N, noise_size) tensor, a sampler called with the shape, or None (standard
                normal, ``num_batches`` rows).
            label: (N,) class indices, a sampler called with ``(N,)``, or None (uniform classes).
                With ``use_outside_embedding=True``, (N, shared_dim) class vectors instead.
            num_batches: batch size when ``noise`` is not a tensor.
            return_noise: also return the noise and labels used.
            truncation: if >= 0, noise is clamped to [-truncation, truncation].

        Returns:
            (N, out_channels, S, S) images in [-1, 1], or with ``return_noise`` a dict with
            ``fake_img``, ``noise_batch`` and ``label``.
        """
        device = self._device
        noise_batch = self._noise_batch(noise, num_batches)
        if truncation >= 0.0:
            noise_batch = noise_batch.clamp(-truncation, truncation)
        label_batch = self._label_batch(label, noise_batch.size(0), use_outside_embedding)
        noise_batch = noise_batch.to(device)

        class_vector = None
        if label_batch is not None:
            label_batch = label_batch.to(device)
            class_vector = (label_batch if use_outside_embedding
                            else self.shared_embedding(label_batch))

        n_res_blocks = sum(not isinstance(b, SelfAttentionBlock) for b in self.conv_blocks)
        if self.split_noise:
            z, *chunks = torch.split(noise_batch, self.noise_chunk_size, dim=1)
            ys = chunks if class_vector is None else [torch.cat([class_vector, c], dim=1)
                                                      for c in chunks]
        else:
            z, ys = noise_batch, [class_vector] * n_res_blocks

        x = self.noise2feat(z).view(z.size(0), -1, self.input_scale, self.input_scale)
        y_iter = iter(ys)
        for block in self.conv_blocks:
            x = block(x) if isinstance(block, SelfAttentionBlock) else block(x, next(y_iter))
        img = torch.tanh(self.output_layer(x))
        if self.rgb2bgr:
            img = img.flip(1)

        if return_noise:
            return dict(fake_img=img, noise_batch=noise_batch, label=label_batch)
        return img
