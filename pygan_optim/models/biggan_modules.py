"""Building blocks of BigGAN (Brock et al., "Large Scale GAN Training for High Fidelity Natural
Image Synthesis", ICLR 2019), written to the behaviour of MMagic's BigGAN (reference/mmengine_api.md
sections 6.3 and 6.4).

Submodule names follow MMagic's layout (``conv1.conv.weight``, ``bn1.gain.weight``,
``output_layer.bn.running_mean``, ``u0``/``sv0`` on each spectral-normalised layer), so a state dict
saved by either implementation loads into the other.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule

__all__ = [
    "SNOptions", "SNConv2d", "SNLinear", "SNEmbedding", "build_activation", "build_upsample",
    "init_weights_", "orthogonal_", "resolve_init_cfg", "ConvUnit", "ConditionalBatchNorm2d",
    "SelfAttentionBlock", "GenResBlock", "DiscResBlock", "OutputLayer",
]

# --------------------------------------------------------------------------------------------
# Spectral normalisation, "ajbrock" style
# --------------------------------------------------------------------------------------------


class _SpectralNormMixin:
    """Divides the layer's weight by an estimate of its largest singular value.

    One power-iteration step per forward, with the left singular vector kept in the buffer
    ``u0`` (shape ``(1, out)``) and the last estimate in ``sv0`` (shape ``(1,)``). Both are
    buffers, not parameters, so the optimizer never sees them. They change only in training mode:
    evaluation is then a pure function of the weights.
    """

    def _init_spectral_norm(self, num_outputs: int, eps: float, num_itrs: int = 1) -> None:
        if num_itrs < 1:
            raise ValueError(f"num_itrs must be >= 1, got {num_itrs}")
        self.sn_eps = eps
        self.sn_num_itrs = num_itrs
        self.register_buffer("u0", torch.randn(1, num_outputs))
        self.register_buffer("sv0", torch.ones(1))

    def normalized_weight(self) -> torch.Tensor:
        weight = self.weight
        w_mat = weight.reshape(weight.size(0), -1)
        # The singular vectors are constants for autograd; only the final Rayleigh quotient
        # carries gradient to the weight (as in the original implementation).
        with torch.no_grad():
            u = self.u0
            for _ in range(self.sn_num_itrs):
                v = F.normalize(u @ w_mat, dim=1, eps=self.sn_eps)
                u = F.normalize(v @ w_mat.t(), dim=1, eps=self.sn_eps)
            if self.training:
                self.u0.copy_(u)
        sigma = ((v @ w_mat.t()) @ u.t()).squeeze()
        if self.training:
            self.sv0.copy_(sigma.detach().reshape(1))
        return weight / sigma

    def extra_repr(self) -> str:  # shown in print(model)
        return super().extra_repr() + f", sn_eps={self.sn_eps}"


class SNConv2d(_SpectralNormMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is spectrally normalised at every forward."""

    def __init__(self, *args, eps: float = 1e-6, num_itrs: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spectral_norm(self.out_channels, eps, num_itrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class SNLinear(_SpectralNormMixin, nn.Linear):
    """``nn.Linear`` whose weight is spectrally normalised at every forward."""

    def __init__(self, *args, eps: float = 1e-6, num_itrs: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spectral_norm(self.out_features, eps, num_itrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class SNEmbedding(_SpectralNormMixin, nn.Embedding):
    """``nn.Embedding`` whose (num_embeddings x dim) table is spectrally normalised."""

    def __init__(self, *args, eps: float = 1e-6, num_itrs: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spectral_norm(self.num_embeddings, eps, num_itrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.normalized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


@dataclass(frozen=True)
class SNOptions:
    """How to build the weight layers of a model: with or without spectral norm, and which kind.

    ``style='ajbrock'`` uses the layers above; ``style='torch'`` wraps plain layers with
    ``torch.nn.utils.spectral_norm`` (parameter ``weight_orig``, buffers ``weight_u/weight_v``).
    Neither adds parameters.
    """

    enabled: bool = True
    style: str = "ajbrock"
    eps: float = 1e-6

    def __post_init__(self):
        if self.style not in ("ajbrock", "torch"):
            raise ValueError(f"sn_style must be 'ajbrock' or 'torch', got {self.style!r}")

    def _wrap(self, layer: nn.Module) -> nn.Module:
        return nn.utils.spectral_norm(layer, eps=self.eps) if self.enabled else layer

    def conv(self, in_ch: int, out_ch: int, kernel_size: int, bias: bool = True) -> nn.Module:
        padding = kernel_size // 2  # "same" size: BigGAN only uses 1x1 and 3x3 kernels
        if self.enabled and self.style == "ajbrock":
            return SNConv2d(in_ch, out_ch, kernel_size, padding=padding, bias=bias, eps=self.eps)
        return self._wrap(nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=bias))

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        if self.enabled and self.style == "ajbrock":
            return SNLinear(in_features, out_features, bias=bias, eps=self.eps)
        return self._wrap(nn.Linear(in_features, out_features, bias=bias))

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        if self.enabled and self.style == "ajbrock":
            return SNEmbedding(num_embeddings, dim, eps=self.eps)
        return self._wrap(nn.Embedding(num_embeddings, dim))


# --------------------------------------------------------------------------------------------
# Config helpers (MMCV-style dicts without needing MMCV)
# --------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "ReLU": nn.ReLU, "LeakyReLU": nn.LeakyReLU, "ReLU6": nn.ReLU6, "ELU": nn.ELU,
    "SiLU": nn.SiLU, "Swish": nn.SiLU, "GELU": nn.GELU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid,
    "PReLU": nn.PReLU,
}


def build_activation(cfg: dict, inplace: Optional[bool] = None) -> nn.Module:
    """Builds an activation from an MMCV-style dict such as ``dict(type='ReLU', inplace=True)``.

    MMEngine's own MODELS registry holds no activation layers (MMCV adds them), so the common
    torch ones are mapped here; other names are looked up in MMEngine's MODELS.
    ``inplace`` overrides the config's choice, for call sites whose input must survive.
    """
    cfg = dict(cfg)
    name = cfg.pop("type")
    cls = _ACTIVATIONS.get(name)
    if cls is None:
        from mmengine.registry import MODELS
        cls = MODELS.get(name)
        if cls is None:
            raise KeyError(f"unknown activation type {name!r}")
    if inplace is not None and "inplace" in inspect.signature(cls).parameters:
        cfg["inplace"] = inplace
    return cls(**cfg)


def build_upsample(cfg: Optional[dict]) -> Optional[nn.Module]:
    """``dict(type='nearest'|'bilinear', scale_factor=2)`` -> ``nn.Upsample``; None -> None."""
    if cfg is None:
        return None
    cfg = dict(cfg)
    mode = cfg.pop("type")
    return nn.Upsample(mode=mode, **cfg)


def _build_bn(num_features: int, cfg: dict) -> nn.Module:
    """``dict(type='BN'|'SyncBN', eps=..., momentum=...)`` -> an affine 2d batch norm."""
    cfg = dict(cfg)
    kind = cfg.pop("type")
    cfg.pop("requires_grad", None)  # MMCV key; parameters are always trainable here
    if kind in ("BN", "BN2d"):
        return nn.BatchNorm2d(num_features, **cfg)
    if kind == "SyncBN":
        return nn.SyncBatchNorm(num_features, **cfg)
    raise ValueError(f"unsupported norm type {kind!r} (expected 'BN' or 'SyncBN')")


INIT_TYPES = ("ortho", "N02", "xavier")


def resolve_init_cfg(init_type: Optional[str], init_cfg: Optional[dict]) -> dict:
    """Merges the 0.x spelling ``init_type='ortho'`` and MMagic's ``init_cfg=dict(type='ortho')``.

    Either may be given, or both if they agree; neither means orthogonal init.
    """
    if init_cfg is not None and "type" not in init_cfg:
        raise ValueError(f"init_cfg needs a 'type' key, got {init_cfg!r}")
    if init_type is not None and init_cfg is not None and init_cfg["type"] != init_type:
        raise ValueError(f"init_type={init_type!r} contradicts init_cfg={init_cfg!r}")
    cfg = dict(init_cfg) if init_cfg is not None else dict(type=init_type or "ortho")
    if cfg["type"] not in INIT_TYPES + ("Pretrained",):
        raise ValueError(f"unknown init type {cfg['type']!r}; expected one of "
                         f"{INIT_TYPES + ('Pretrained',)}")
    if cfg["type"] == "Pretrained" and "checkpoint" not in cfg:
        raise ValueError("init_cfg of type 'Pretrained' needs a 'checkpoint' key")
    return cfg


@torch.no_grad()
def orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """``nn.init.orthogonal_`` (gain 1) with the same random draw, faster for long matrices.

    BigGAN-128 has 3x3 convs up to 1536 x 13824; a Householder QR of those takes ~5 s each on two
    cores (~45 s to build G and D). A Gaussian matrix at least twice as long as wide has a
    condition number below ~6, so Cholesky-QR (Q = A R^-1 with R^T R = A^T A) is accurate to
    ~1e-6 in fp32 and runs on matmuls (~6x faster). R has a positive diagonal, the same sign
    convention torch applies to its QR, so the result matches ``nn.init.orthogonal_`` from the
    same seed to float rounding. Near-square shapes (ill-conditioned) use torch's QR path.
    """
    rows = weight.size(0)
    cols = weight.numel() // rows
    a = weight.new_empty((rows, cols)).normal_(0, 1)
    tall = a if rows >= cols else a.t()
    m, n = tall.shape
    q = None
    if m >= 2 * n:
        chol, info = torch.linalg.cholesky_ex(tall.t() @ tall)
        if int(info) == 0:
            q = torch.linalg.solve_triangular(chol, tall.t(), upper=False).t()
    if q is None:
        q, r = torch.linalg.qr(tall)
        q *= torch.diagonal(r).sign()
    weight.copy_((q if rows >= cols else q.t()).reshape(weight.shape))
    return weight


@torch.no_grad()
def init_weights_(module: nn.Module, init_type: str) -> None:
    """Initialises the weight of every Conv2d, Linear and Embedding under ``module``.

    'ortho': orthogonal; 'N02': normal(0, 0.02); 'xavier': Xavier-normal (gain 1). Like MMagic,
    'ortho' leaves biases at torch's defaults, while 'N02'/'xavier' zero them. With torch-style
    spectral norm the learnable tensor is ``weight_orig``; ``weight`` is derived from it.
    """
    if init_type not in INIT_TYPES:
        raise ValueError(f"unknown init type {init_type!r}; expected one of {INIT_TYPES}")
    for m in module.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            continue
        weight = getattr(m, "weight_orig", m.weight)
        if init_type == "ortho":
            orthogonal_(weight)
            continue
        if init_type == "N02":
            nn.init.normal_(weight, 0.0, 0.02)
        else:
            nn.init.xavier_normal_(weight, gain=1.0)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class ConvUnit(nn.Module):
    """A convolution under the name ``conv``.

    MMagic wraps every convolution in a ConvModule, so its checkpoints store ``<name>.conv.weight``;
    this holder keeps the same keys.
    """

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift come from a conditioning vector (or label) per sample.

    ``out = bn(x) * (1 + gain(y)) + bias(y)`` with a non-affine BN: the "1 +" makes a freshly
    initialised layer start close to plain normalisation. ``cond_dim == 0`` (unconditional, no
    split noise) falls back to an ordinary affine BN that ignores ``y``.
    """

    def __init__(self, num_features: int, cond_dim: int, sn: SNOptions,
                 input_is_label: bool = False, bn_eps: float = 1e-5, momentum: float = 0.1,
                 auto_sync_bn: bool = True):
        super().__init__()
        self.use_cbn = cond_dim > 0
        if self.use_cbn:
            if input_is_label:  # y is a class index: look the gain/bias up directly
                self.gain = nn.Embedding(cond_dim, num_features)
                self.bias = nn.Embedding(cond_dim, num_features)
            else:
                self.gain = sn.linear(cond_dim, num_features, bias=False)
                self.bias = sn.linear(cond_dim, num_features, bias=False)
        self.bn = nn.BatchNorm2d(num_features, eps=bn_eps, momentum=momentum,
                                 affine=not self.use_cbn)
        # Only meaningful (and only possible) once a process group exists.
        if auto_sync_bn and dist.is_available() and dist.is_initialized():
            self.bn = nn.SyncBatchNorm.convert_sync_batchnorm(self.bn)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        out = self.bn(x)
        if not self.use_cbn:
            return out
        gain = 1.0 + self.gain(y).view(y.size(0), -1, 1, 1)
        bias = self.bias(y).view(y.size(0), -1, 1, 1)
        return out * gain + bias


class SelfAttentionBlock(nn.Module):
    """Non-local self-attention (SAGAN) with a learnable residual gate ``gamma``.

    ``gamma`` starts at 0, so the block is the identity at initialisation and the network
    learns how much attention to mix in. Keys (phi) and values (g) are 2x2 max-pooled, which
    cuts the attention matrix to HW x HW/4.
    """

    def __init__(self, in_channels: int, sn: SNOptions):
        super().__init__()
        if in_channels % 8:
            raise ValueError(f"attention needs channels divisible by 8, got {in_channels}")
        self.in_channels = in_channels
        self.theta = ConvUnit(sn.conv(in_channels, in_channels // 8, 1, bias=False))
        self.phi = ConvUnit(sn.conv(in_channels, in_channels // 8, 1, bias=False))
        self.g = ConvUnit(sn.conv(in_channels, in_channels // 2, 1, bias=False))
        self.o = ConvUnit(sn.conv(in_channels // 2, in_channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        query = self.theta(x).flatten(2)                       # (B, C/8, HW)
        key = F.max_pool2d(self.phi(x), 2).flatten(2)          # (B, C/8, HW/4)
        value = F.max_pool2d(self.g(x), 2).flatten(2)          # (B, C/2, HW/4)
        attn = torch.softmax(query.transpose(1, 2) @ key, dim=-1)   # (B, HW, HW/4)
        out = (value @ attn.transpose(1, 2)).view(b, c // 2, h, w)
        return self.gamma * self.o(out) + x


class GenResBlock(nn.Module):
    """Generator residual block: CBN -> act -> up -> conv3x3 -> CBN -> act -> conv3x3, plus a
    1x1 conv shortcut on the upsampled input (present whenever shape changes).

    ``y`` is the conditioning vector of this block (class embedding + its noise chunk).
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, sn: SNOptions,
                 act_cfg: dict, upsample_cfg: Optional[dict], input_is_label: bool = False,
                 auto_sync_bn: bool = True):
        super().__init__()
        # Registration order matches MMagic's, so parameter order (and optimizer state) does too.
        self.activation = build_activation(act_cfg)
        self.upsample_layer = build_upsample(upsample_cfg)
        self.learnable_sc = in_channels != out_channels or self.upsample_layer is not None
        self.shortcut = (ConvUnit(sn.conv(in_channels, out_channels, 1))
                         if self.learnable_sc else None)
        cbn = dict(cond_dim=cond_dim, sn=sn, input_is_label=input_is_label,
                   auto_sync_bn=auto_sync_bn)
        self.bn1 = ConditionalBatchNorm2d(in_channels, **cbn)
        self.bn2 = ConditionalBatchNorm2d(out_channels, **cbn)
        self.conv1 = ConvUnit(sn.conv(in_channels, out_channels, 3))
        self.conv2 = ConvUnit(sn.conv(out_channels, out_channels, 3))

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.activation(self.bn1(x, y))  # bn1 returns a fresh tensor: in-place act is safe
        if self.upsample_layer is not None:
            h = self.upsample_layer(h)
            x = self.upsample_layer(x)
        h = self.conv2(self.activation(self.bn2(self.conv1(h), y)))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return h + x


class DiscResBlock(nn.Module):
    """Discriminator residual block: [act] -> conv3x3 -> act -> conv3x3 -> [avgpool2], plus a
    1x1 conv shortcut (present iff channels change or it downsamples).

    The head block sees raw images, so it has no pre-activation and pools before its shortcut
    conv (4x cheaper, same result for a linear map); the others conv first, then pool.

    The pre-activation is always out of place, even with ``act_cfg=dict(..., inplace=True)``:
    the shortcut must see the block's input unchanged. (MMagic applies the configured in-place
    ReLU there, so its shortcut sees relu(x); the original BigGAN code avoids that on purpose.)
    """

    def __init__(self, in_channels: int, out_channels: int, sn: SNOptions, act_cfg: dict,
                 with_downsample: bool = True, is_head_block: bool = False):
        super().__init__()
        self.activation = build_activation(act_cfg)
        self.pre_activation = None if is_head_block else build_activation(act_cfg, inplace=False)
        self.is_head_block = is_head_block
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2) if with_downsample else None
        self.learnable_sc = in_channels != out_channels or with_downsample
        self.shortcut = (ConvUnit(sn.conv(in_channels, out_channels, 1))
                         if self.learnable_sc else None)
        self.conv1 = ConvUnit(sn.conv(in_channels, out_channels, 3))
        self.conv2 = ConvUnit(sn.conv(out_channels, out_channels, 3))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self._pool(x)
        if self.is_head_block:
            return self.shortcut(self._pool(x))
        return self._pool(self.shortcut(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.pre_activation is None else self.pre_activation(x)
        h = self.conv2(self.activation(self.conv1(h)))
        return self._pool(h) + self._residual(x)


class OutputLayer(nn.Module):
    """Generator head: BN (affine; none when ``norm_cfg`` is None) -> act -> conv3x3 to
    image channels (tanh is applied by G). The conv is registered before the BN, as in
    MMagic's and MMGeneration's ConvModule: optimizer states list parameters in that
    order, so checkpoints of either move over."""

    def __init__(self, in_channels: int, out_channels: int, sn: SNOptions, act_cfg: dict,
                 norm_cfg: Optional[dict]):
        super().__init__()
        self.conv = sn.conv(in_channels, out_channels, 3)
        self.bn = None if norm_cfg is None else _build_bn(in_channels, norm_cfg)
        self.activate = build_activation(act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.activate(x if self.bn is None else self.bn(x)))


class BigGANNet(BaseModule):
    """What the generator and the discriminator share: ``init_type``/``init_cfg``
    handling, the one supported block type, and drawing the initial weights."""

    block_type = ""  # the blocks_cfg type the subclass builds

    def __init__(self, blocks_cfg: dict, init_type: Optional[str], init_cfg: Optional[dict]):
        super().__init__(init_cfg=resolve_init_cfg(init_type, init_cfg))
        if blocks_cfg.get("type") != self.block_type or len(blocks_cfg) > 1:
            raise NotImplementedError(f"only blocks_cfg=dict(type='{self.block_type}') is "
                                      f"supported, got {blocks_cfg!r}")

    def _draw_initial_weights(self) -> None:
        """Call once the layers exist: 'Pretrained' starts from 'ortho' until loaded."""
        kind = self.init_cfg["type"]
        init_weights_(self, "ortho" if kind == "Pretrained" else kind)
        # Runner.init_weights() skips initialised modules; a checkpoint still has to be loaded.
        self._is_init = kind != "Pretrained"

    def init_weights(self) -> None:
        """Re-draws the weights per ``init_cfg`` (or loads its 'Pretrained' checkpoint)."""
        if self.init_cfg["type"] == "Pretrained":
            super().init_weights()
        else:
            init_weights_(self, self.init_cfg["type"])
        self._is_init = True
