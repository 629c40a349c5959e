"""The ORDER of ``named_parameters()`` (and ``named_buffers()``) of our BigGAN networks equals
MMagic 1.x's and MMGeneration 0.7.3's for the same configuration.

Why the order matters: a torch optimizer state_dict refers to parameters by position
(``state[i]``, ``param_groups[k]['params'] == [0, 1, ...]`` in ``parameters()`` order), so an
MMagic/MMGeneration optimizer checkpoint loaded into our model puts each Adam moment on the
right tensor only if both models enumerate their parameters in the same order.

The expected lists are built here from a description of how the reference code registers its
submodules, NOT from our code. Sources (read at MMagic 0a560bb, MMGeneration tag v0.7.3, mmcv
2.x and v1.7.2; MMGeneration's classes are line-for-line the same as MMagic's here):

* mmagic/models/editors/biggan/biggan_generator.py ``BigGANGenerator.__init__``
  (mmgen/models/architectures/biggan/generator_discriminator.py ``BigGANGenerator``):
  noise2feat, shared_embedding, conv_blocks (each block, then SelfAttentionBlock if
  ``arch['attention'][i]``), output_layer.
* mmagic/.../biggan_discriminator.py ``BigGANDiscriminator.__init__`` (mmgen ... same file):
  conv_blocks (block, optional attention), activate, decision, proj_y (if num_classes > 0).
* mmagic/.../biggan_modules.py (mmgen/.../biggan/modules.py):
  ``BigGANGenResBlock``: activation, upsample_layer, shortcut (if learnable_sc), bn1, bn2,
  conv1, conv2.  ``BigGANConditionBN``: gain, bias (Linear+SN, or plain Embedding when
  input_is_label), then bn (affine only when unconditional).  ``SelfAttentionBlock``: theta,
  phi, g, o (1x1, bias=False), then the Parameter ``gamma``.  ``BigGANDiscResBlock``:
  activation, downsample, shortcut (if learnable_sc), conv1, conv2.
  ``SNConvModule(ConvModule)``: mmcv's ConvModule registers ``conv`` and then the norm
  (``bn``, named by build_norm_layer) whatever ``order`` says (mmcv/cnn/bricks/conv_module.py);
  SNConvModule then swaps ``conv`` in place (same slot in ``_modules``) for SNConv2d ('ajbrock')
  or ``spectral_norm(conv)`` ('torch').
* mmagic/.../biggan_snmodule.py: SNConv2d/SNLinear/SNEmbedding = the torch layer (weight, then
  bias) + SpectralNorm, which registers buffers ``u0`` then ``sv0``.
* torch.nn.utils.spectral_norm deletes ``weight`` and re-registers it as ``weight_orig`` at the
  END of the module's parameters (so after ``bias``), then buffers ``weight_u``, ``weight_v``.

``named_parameters()`` walks ``named_modules()`` pre-order and lists each module's OWN
parameters before its children's: SelfAttentionBlock's ``gamma`` therefore comes before
``theta.conv.weight`` even though it is registered last.
"""
import pytest

from pygan_optim.models import BigGANDiscriminator, BigGANGenerator

SN_STYLES = ('ajbrock', 'torch', None)  # None: with_spectral_norm=False
BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


# ------------------------------------------------------------------------------------------
# MMagic's registration order, as (parameters, buffers) name lists
# ------------------------------------------------------------------------------------------


def weight_layer(prefix, sn, bias=True):
    """nn.Linear / nn.Conv2d / nn.Embedding, possibly spectrally normalised.

    ajbrock (biggan_snmodule.py SNConv2d/SNLinear/SNEmbedding): weight, bias; buffers u0, sv0.
    torch (torch.nn.utils.spectral_norm): bias, weight_orig; buffers weight_u, weight_v.
    """
    b = [f'{prefix}.bias'] if bias else []
    if sn == 'torch':
        return b + [f'{prefix}.weight_orig'], [f'{prefix}.weight_u', f'{prefix}.weight_v']
    if sn == 'ajbrock':
        return [f'{prefix}.weight'] + b, [f'{prefix}.u0', f'{prefix}.sv0']
    return [f'{prefix}.weight'] + b, []


def batch_norm(prefix, affine=True):
    """nn.BatchNorm2d: weight, bias (if affine); running_mean, running_var, num_batches_tracked."""
    params = [f'{prefix}.weight', f'{prefix}.bias'] if affine else []
    return params, [f'{prefix}.{b}' for b in BN_BUFFERS]


def concat(*parts):
    params, buffers = [], []
    for p, b in parts:
        params += p
        buffers += b
    return params, buffers


def sn_conv_module(prefix, sn, bias=True, norm=False):
    """biggan_modules.py SNConvModule (mmcv ConvModule): conv first, then the norm ``bn``."""
    parts = [weight_layer(f'{prefix}.conv', sn, bias)]
    if norm:
        parts.append(batch_norm(f'{prefix}.bn'))
    return concat(*parts)


def condition_bn(prefix, cond, sn):
    """biggan_modules.py BigGANConditionBN: gain, bias, then bn.

    cond: 'linear' (class vector / noise chunk in: SN linears without bias), 'label' (raw label
    in: plain nn.Embedding, never SN), None (linear_input_channels == 0: affine BN only).
    """
    if cond == 'linear':
        return concat(weight_layer(f'{prefix}.gain', sn, bias=False),
                      weight_layer(f'{prefix}.bias', sn, bias=False),
                      batch_norm(f'{prefix}.bn', affine=False))
    if cond == 'label':
        return concat(weight_layer(f'{prefix}.gain', None, bias=False),
                      weight_layer(f'{prefix}.bias', None, bias=False),
                      batch_norm(f'{prefix}.bn', affine=False))
    return batch_norm(f'{prefix}.bn', affine=True)


def self_attention(prefix, sn):
    """biggan_modules.py SelfAttentionBlock: own Parameter gamma is listed first (module's own
    parameters precede its children's), then theta, phi, g, o (SNConvModule, bias=False)."""
    params = [f'{prefix}.gamma']
    return concat((params, []), *[sn_conv_module(f'{prefix}.{n}', sn, bias=False)
                                  for n in ('theta', 'phi', 'g', 'o')])


def gen_res_block(prefix, learnable_sc, cond, sn):
    """biggan_modules.py BigGANGenResBlock: shortcut (if learnable_sc), bn1, bn2, conv1, conv2."""
    parts = [sn_conv_module(f'{prefix}.shortcut', sn)] if learnable_sc else []
    parts += [condition_bn(f'{prefix}.bn1', cond, sn), condition_bn(f'{prefix}.bn2', cond, sn),
              sn_conv_module(f'{prefix}.conv1', sn), sn_conv_module(f'{prefix}.conv2', sn)]
    return concat(*parts)


def disc_res_block(prefix, learnable_sc, sn):
    """biggan_modules.py BigGANDiscResBlock: shortcut (if learnable_sc), conv1, conv2."""
    parts = [sn_conv_module(f'{prefix}.shortcut', sn)] if learnable_sc else []
    parts += [sn_conv_module(f'{prefix}.conv1', sn), sn_conv_module(f'{prefix}.conv2', sn)]
    return concat(*parts)


def mmagic_generator(arch, sn, num_classes, with_shared_embedding, split_noise, out_norm):
    """biggan_generator.py BigGANGenerator.__init__: noise2feat, shared_embedding,
    conv_blocks, output_layer (SNConvModule with norm_cfg=out_norm_cfg, bias=True)."""
    if num_classes > 0:
        cond = 'linear' if with_shared_embedding else 'label'
    else:
        cond = 'linear' if split_noise else None  # dim_after_concat = noise_chunk_size
    parts = [weight_layer('noise2feat', sn)]
    if with_shared_embedding:  # nn.Embedding, no SN; otherwise nn.Identity
        parts.append(weight_layer('shared_embedding', None, bias=False))
    idx = 0
    for i, (cin, cout) in enumerate(zip(arch['in_channels'], arch['out_channels'])):
        learnable_sc = cin != cout or arch['upsample'][i]
        parts.append(gen_res_block(f'conv_blocks.{idx}', learnable_sc, cond, sn))
        idx += 1
        if arch['attention'][i]:
            parts.append(self_attention(f'conv_blocks.{idx}', sn))
            idx += 1
    parts.append(sn_conv_module('output_layer', sn, bias=True, norm=out_norm))
    return concat(*parts)


def mmagic_discriminator(arch, sn, num_classes):
    """biggan_discriminator.py BigGANDiscriminator.__init__: conv_blocks, (activate),
    decision (Linear, bias), proj_y (Embedding, SN'd like the rest) if num_classes > 0."""
    parts, idx = [], 0
    for i, (cin, cout) in enumerate(zip(arch['in_channels'], arch['out_channels'])):
        learnable_sc = cin != cout or arch['downsample'][i]
        parts.append(disc_res_block(f'conv_blocks.{idx}', learnable_sc, sn))
        idx += 1
        if arch['attention'][i]:
            parts.append(self_attention(f'conv_blocks.{idx}', sn))
            idx += 1
    parts.append(weight_layer('decision', sn))
    if num_classes > 0:
        parts.append(weight_layer('proj_y', sn, bias=False))
    return concat(*parts)


# ------------------------------------------------------------------------------------------
# Configurations (small: output/input scale 32, base_channels 8)
# ------------------------------------------------------------------------------------------

BASE = 8
# MMagic's default arch at 32 px (``_get_default_arch_cfg('32')``): no attention.
G_ARCH_32 = dict(in_channels=[4 * BASE] * 3, out_channels=[4 * BASE] * 3,
                 upsample=[True] * 3, attention=[False] * 3)
D_ARCH_32 = dict(in_channels=[3] + [4 * BASE] * 3, out_channels=[4 * BASE] * 4,
                 downsample=[True, True, False, False], attention=[False] * 4)
# Custom archs: attention after block 1, and a block without shortcut (same channels, no
# resampling) in each network.
G_ARCH_ATTN = dict(in_channels=[32, 32, 16, 16], out_channels=[32, 16, 16, 16],
                   upsample=[True, True, False, True], attention=[False, True, False, False])
D_ARCH_ATTN = dict(in_channels=[3, 16, 32, 32], out_channels=[16, 32, 32, 32],
                   downsample=[True, True, False, False], attention=[False, True, False, False])

# name -> (our constructor kwargs, MMagic description kwargs)
G_CASES = {
    'conditional_shared_embedding': dict(num_classes=4, with_shared_embedding=True,
                                         split_noise=True),
    'conditional_no_shared_embedding': dict(num_classes=4, with_shared_embedding=False,
                                            split_noise=False),
    'unconditional_split_noise': dict(num_classes=0, with_shared_embedding=False,
                                      split_noise=True),
    'unconditional_no_split_noise': dict(num_classes=0, with_shared_embedding=False,
                                         split_noise=False),
    'conditional_out_norm_none': dict(num_classes=4, with_shared_embedding=True,
                                      split_noise=True, out_norm_cfg=None),
    'attention': dict(num_classes=4, with_shared_embedding=True, split_noise=True,
                      arch_cfg=G_ARCH_ATTN),
    'attention_unconditional_out_norm_none': dict(num_classes=0, with_shared_embedding=False,
                                                  split_noise=True, arch_cfg=G_ARCH_ATTN,
                                                  out_norm_cfg=None),
}
D_CASES = {
    'unconditional': dict(num_classes=0),
    'conditional': dict(num_classes=4),
    'attention_conditional': dict(num_classes=4, arch_cfg=D_ARCH_ATTN),
    'attention_unconditional': dict(num_classes=0, arch_cfg=D_ARCH_ATTN),
}


def sn_kwargs(sn):
    if sn is None:
        return dict(with_spectral_norm=False)
    return dict(with_spectral_norm=True, sn_style=sn)


def build_g(sn, case):
    cfg = dict(G_CASES[case])
    model = BigGANGenerator(output_scale=32, noise_size=20, base_channels=BASE, shared_dim=16,
                            auto_sync_bn=False, **sn_kwargs(sn), **cfg)
    expected = mmagic_generator(
        cfg.get('arch_cfg', G_ARCH_32), sn, cfg['num_classes'], cfg['with_shared_embedding'],
        cfg['split_noise'], out_norm=cfg.get('out_norm_cfg', dict(type='BN')) is not None)
    return model, expected


def build_d(sn, case):
    cfg = dict(D_CASES[case])
    model = BigGANDiscriminator(input_scale=32, base_channels=BASE, **sn_kwargs(sn), **cfg)
    expected = mmagic_discriminator(cfg.get('arch_cfg', D_ARCH_32), sn, cfg['num_classes'])
    return model, expected


def first_difference(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f'first difference at position {i}: ours {a!r}, MMagic {b!r}'
    return f'lengths differ: ours {len(got)}, MMagic {len(want)}'


def assert_same_order(got, want):
    assert got == want, first_difference(got, want) + f'\nours:   {got}\nMMagic: {want}'


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


NETWORK_CASES = [('G', c) for c in sorted(G_CASES)] + [('D', c) for c in sorted(D_CASES)]


@pytest.mark.parametrize('kind', ['parameters', 'buffers'])
@pytest.mark.parametrize('network, case', NETWORK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize('sn', SN_STYLES, ids=lambda s: f'sn={s}')
def test_order_is_mmagics(sn, network, case, kind):
    model, (params, buffers) = (build_g if network == 'G' else build_d)(sn, case)
    named = model.named_parameters() if kind == 'parameters' else model.named_buffers()
    assert_same_order([n for n, _ in named], params if kind == 'parameters' else buffers)


def test_parameters_follow_named_parameters():
    """The optimizer sees ``parameters()``; it must enumerate the same tensors in the same
    order as ``named_parameters()`` (no parameter shared between two names)."""
    for model in (build_g('ajbrock', 'attention')[0], build_d('torch', 'attention_conditional')[0]):
        named = [p for _, p in model.named_parameters()]
        plain = list(model.parameters())
        assert len(named) == len(plain) and all(a is b for a, b in zip(named, plain))


def test_expected_list_spot_checks():
    """Hand-written anchors for the description above (guards against a bug in the helpers
    that would make both sides agree on something MMagic does not do)."""
    params, _ = mmagic_generator(G_ARCH_ATTN, 'ajbrock', 4, True, True, out_norm=True)
    assert params[:3] == ['noise2feat.weight', 'noise2feat.bias', 'shared_embedding.weight']
    assert params[3:9] == ['conv_blocks.0.shortcut.conv.weight',
                           'conv_blocks.0.shortcut.conv.bias',
                           'conv_blocks.0.bn1.gain.weight', 'conv_blocks.0.bn1.bias.weight',
                           'conv_blocks.0.bn2.gain.weight', 'conv_blocks.0.bn2.bias.weight']
    i = params.index('conv_blocks.2.gamma')
    assert params[i:i + 5] == ['conv_blocks.2.gamma', 'conv_blocks.2.theta.conv.weight',
                               'conv_blocks.2.phi.conv.weight', 'conv_blocks.2.g.conv.weight',
                               'conv_blocks.2.o.conv.weight']
    assert 'conv_blocks.3.shortcut.conv.weight' not in params  # 16 -> 16, no upsample
    assert params[-4:] == ['output_layer.conv.weight', 'output_layer.conv.bias',
                           'output_layer.bn.weight', 'output_layer.bn.bias']
    params, _ = mmagic_generator(G_ARCH_32, 'torch', 4, True, True, out_norm=True)
    assert params[-4:] == ['output_layer.conv.bias', 'output_layer.conv.weight_orig',
                           'output_layer.bn.weight', 'output_layer.bn.bias']
    params, _ = mmagic_discriminator(D_ARCH_32, 'torch', 4)
    assert params[-3:] == ['decision.bias', 'decision.weight_orig', 'proj_y.weight_orig']
