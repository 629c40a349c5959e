"""BigGAN generator/discriminator: shapes, parameter counts against the spec, spectral norm,
gradients, initialisation, determinism and registration (reference/mmengine_api.md 6.3-6.4)."""
import copy
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pygan_optim.models import BigGANDiscriminator, BigGANGenerator, register_models
from pygan_optim.models.biggan_modules import (SelfAttentionBlock, SNConv2d, SNEmbedding,
                                               SNLinear, orthogonal_)

# The seed config of the spec (section 6.3), in the project's 0.x spelling (init_type).
G_CFG = dict(type='BigGANGenerator', output_scale=128, noise_size=120, num_classes=1000,
             base_channels=96, shared_dim=128, with_shared_embedding=True, sn_eps=1e-6,
             init_type='ortho', act_cfg=dict(type='ReLU', inplace=True), split_noise=True,
             auto_sync_bn=False)
D_CFG = dict(type='BigGANDiscriminator', input_scale=128, num_classes=1000, base_channels=96,
             sn_eps=1e-6, init_type='ortho', act_cfg=dict(type='ReLU', inplace=True),
             with_spectral_norm=True)

SMALL_G = dict(output_scale=32, noise_size=120, num_classes=10, base_channels=16, shared_dim=32,
               act_cfg=dict(type='ReLU', inplace=True), auto_sync_bn=False)
SMALL_D = dict(input_scale=32, num_classes=10, base_channels=16,
               act_cfg=dict(type='ReLU', inplace=True))
SN_TYPES = (SNConv2d, SNLinear, SNEmbedding)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def n_buffers(module):
    return sum(b.numel() for b in module.buffers())


@pytest.fixture(scope='module')
def big():
    """G and D at 128 px, built from the config dicts through MMEngine's registry."""
    from mmengine.registry import MODELS
    torch.manual_seed(0)
    register_models()
    return MODELS.build(copy.deepcopy(G_CFG)), MODELS.build(copy.deepcopy(D_CFG))


# ------------------------------------------------------------------------------ registration


def test_registered_in_mmengine_models(big):
    from mmengine.registry import MODELS
    assert MODELS.get('BigGANGenerator') is BigGANGenerator
    assert MODELS.get('BigGANDiscriminator') is BigGANDiscriminator
    G, D = big
    assert isinstance(G, BigGANGenerator) and isinstance(D, BigGANDiscriminator)
    assert G.init_cfg == dict(type='ortho') and D.init_cfg == dict(type='ortho')
    register_models()  # idempotent (force=True)


def test_accepts_mmagic_init_cfg_spelling():
    g = BigGANGenerator(**SMALL_G, init_cfg=dict(type='ortho'))
    d = BigGANDiscriminator(**SMALL_D, init_cfg=dict(type='ortho'))
    assert g.init_cfg['type'] == d.init_cfg['type'] == 'ortho'
    BigGANGenerator(**SMALL_G, init_type='N02', init_cfg=dict(type='N02'))  # agreeing: fine
    with pytest.raises(ValueError, match='contradicts'):
        BigGANGenerator(**SMALL_G, init_type='ortho', init_cfg=dict(type='xavier'))
    with pytest.raises(ValueError, match='unknown init type'):
        BigGANDiscriminator(**SMALL_D, init_type='kaiming')


# ------------------------------------------------------------------ parameter counts (128 px)


def _expected_generator_counts(ch=96, num_classes=1000, shared_dim=128, noise_size=120):
    """Per-module counts from the formulas of spec section 6.4."""
    ins = [ch * m for m in (16, 16, 8, 4, 2)]
    outs = [ch * m for m in (16, 8, 4, 2, 1)]
    chunk = noise_size // (len(ins) + 1)
    d = shared_dim + chunk
    rows = {'noise2feat': chunk * ins[0] * 16 + ins[0] * 16,
            'shared_embedding': num_classes * shared_dim}
    for i, (a, b) in enumerate(zip(ins, outs)):
        rows[f'block{i}'] = (a * b + b) + 2 * d * (a + b) + (9 * a * b + b) + (9 * b * b + b)
    c = outs[3]
    rows['attn'] = 2 * c * c // 8 + 2 * c * c // 2 + 1
    rows['output'] = 2 * ch + (9 * ch * 3 + 3)
    return rows


def _expected_discriminator_counts(ch=96, num_classes=1000):
    ins = [3] + [ch * m for m in (1, 2, 4, 8, 16)]
    outs = [ch * m for m in (1, 2, 4, 8, 16, 16)]
    down = [True] * 5 + [False]
    rows = {}
    for i, (a, b) in enumerate(zip(ins, outs)):
        shortcut = a * b + b if (a != b or down[i]) else 0
        rows[f'block{i}'] = (9 * a * b + b) + (9 * b * b + b) + shortcut
    rows['attn'] = 2 * ch * ch // 8 + 2 * ch * ch // 2 + 1
    rows['decision'] = outs[-1] + 1
    rows['proj_y'] = num_classes * outs[-1]
    return rows


# The table of spec section 6.4, verbatim.
SPEC_G = {'noise2feat': 516_096, 'shared_embedding': 128_000, 'block0': 45_740_544,
          'block1': 17_789_184, 'block2': 4_618_368, 'block3': 1_240_128, 'attn': 46_081,
          'block4': 352_800, 'output': 2_787}
SPEC_D = {'block0': 86_112, 'attn': 11_521, 'block1': 516_672, 'block2': 2_065_536,
          'block3': 8_259_840, 'block4': 33_034_752, 'block5': 42_470_400, 'decision': 1_537,
          'proj_y': 1_536_000}
SPEC_G_TOTAL, SPEC_D_TOTAL = 70_433_988, 87_982_370
SPEC_G_BUFFERS, SPEC_D_BUFFERS = 63_655, 13_192


def _model_rows(model):
    rows, block = {}, 0
    for name, child in model.named_children():
        if name != 'conv_blocks':
            rows['output' if name == 'output_layer' else name] = n_params(child)
    for m in model.conv_blocks:
        if isinstance(m, SelfAttentionBlock):
            rows['attn'] = n_params(m)
        else:
            rows[f'block{block}'] = n_params(m)
            block += 1
    return rows


def test_generator_parameter_count_matches_spec(big):
    G, _ = big
    expected = _expected_generator_counts()
    assert expected == SPEC_G  # the formulas reproduce the spec's table
    assert _model_rows(G) == expected
    assert n_params(G) == sum(expected.values()) == SPEC_G_TOTAL
    assert n_buffers(G) == SPEC_G_BUFFERS


def test_discriminator_parameter_count_matches_spec(big):
    _, D = big
    expected = _expected_discriminator_counts()
    assert expected == SPEC_D
    assert {k: v for k, v in _model_rows(D).items() if k != 'activate'} == expected
    assert n_params(D) == sum(expected.values()) == SPEC_D_TOTAL
    assert n_buffers(D) == SPEC_D_BUFFERS


def test_state_dict_keys_follow_mmagic_layout(big):
    G, D = big
    g_keys, d_keys = set(G.state_dict()), set(D.state_dict())
    for key in ('noise2feat.weight', 'noise2feat.u0', 'noise2feat.sv0', 'shared_embedding.weight',
                'conv_blocks.0.bn1.gain.weight', 'conv_blocks.0.bn1.bias.u0',
                'conv_blocks.0.bn2.bn.running_var', 'conv_blocks.0.conv1.conv.weight',
                'conv_blocks.0.shortcut.conv.bias', 'conv_blocks.4.gamma',
                'conv_blocks.4.theta.conv.weight', 'output_layer.bn.weight',
                'output_layer.conv.weight'):
        assert key in g_keys, key
    for key in ('conv_blocks.0.shortcut.conv.weight', 'conv_blocks.1.gamma',
                'conv_blocks.1.phi.conv.u0', 'conv_blocks.6.conv2.conv.weight',
                'decision.weight', 'decision.u0', 'proj_y.weight', 'proj_y.sv0'):
        assert key in d_keys, key
    assert not any(k.startswith('conv_blocks.6.shortcut') for k in d_keys)  # last block: none


def test_forward_at_128(big):
    G, D = big
    G.train(), D.train()
    z, y = torch.randn(2, 120), torch.tensor([3, 999])
    start = time.perf_counter()
    with torch.no_grad():
        img = G(z, y)
        logits = D(img, y)
    elapsed = time.perf_counter() - start
    assert img.shape == (2, 3, 128, 128) and logits.shape == (2, 1)
    assert img.abs().max() <= 1 and torch.isfinite(logits).all()
    print(f'G+D forward at 128 px, batch 2: {elapsed:.2f} s')


# ------------------------------------------------------------------------- shapes and ranges


def test_generator_shapes_and_range_32():
    G = BigGANGenerator(**SMALL_G)
    img = G(torch.randn(3, 120), torch.tensor([0, 5, 9]))
    assert img.shape == (3, 3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1
    assert G(num_batches=2).shape == (2, 3, 32, 32)            # noise and labels sampled
    assert G(torch.randn(4, 120)).shape == (4, 3, 32, 32)      # labels drawn for the noise's N
    assert G(torch.randn(2, 120), torch.tensor([[1], [2]])).shape == (2, 3, 32, 32)
    out = G(num_batches=2, return_noise=True, truncation=0.5)
    assert set(out) == {'fake_img', 'noise_batch', 'label'}
    assert out['noise_batch'].abs().max() <= 0.5 and out['label'].shape == (2,)
    outside = G(torch.randn(2, 120), torch.randn(2, 32), use_outside_embedding=True)
    assert outside.shape == (2, 3, 32, 32)  # class vectors given instead of indices
    with pytest.raises(ValueError):
        G(torch.randn(2, 119))
    with pytest.raises(ValueError):
        G(torch.randn(2, 120), torch.tensor([1, 2, 3]))


def test_discriminator_shapes_32():
    D = BigGANDiscriminator(**SMALL_D)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert D(x, torch.tensor([0, 1, 2])).shape == (3, 1)
    with pytest.raises(ValueError, match='needs labels'):
        D(x)


def test_unconditional_models():
    with pytest.raises(ValueError, match='with_shared_embedding=False'):
        BigGANGenerator(output_scale=32, base_channels=8)
    G = BigGANGenerator(output_scale=32, base_channels=8, with_shared_embedding=False)
    D = BigGANDiscriminator(input_scale=32, base_channels=8)
    img = G(num_batches=2)
    assert img.shape == (2, 3, 32, 32) and D(img).shape == (2, 1)
    assert not hasattr(D, 'proj_y')


def test_architecture_tables():
    G = BigGANGenerator(output_scale=64, base_channels=8, num_classes=4, shared_dim=16)
    D = BigGANDiscriminator(input_scale=64, base_channels=8, num_classes=4)
    kinds = [type(m).__name__ for m in G.conv_blocks]
    assert kinds == ['GenResBlock'] * 4 + ['SelfAttentionBlock']  # attention at 64x64
    assert G.arch['out_channels'] == [128, 64, 32, 16]
    assert not any(isinstance(m, SelfAttentionBlock) for m in D.conv_blocks)
    assert D.arch['downsample'] == [True] * 4 + [False]
    D32 = BigGANDiscriminator(input_scale=32, base_channels=8)
    assert [b.shortcut is None for b in D32.conv_blocks] == [False, False, True, True]
    with pytest.raises(ValueError, match='output_scale'):
        BigGANGenerator(output_scale=48, base_channels=8, with_shared_embedding=False)


# ---------------------------------------------------------------------------- spectral norm


def _sn_layers(model):
    return [m for m in model.modules() if isinstance(m, SN_TYPES)]


def test_spectral_norm_buffers_and_no_extra_params():
    G, D = BigGANGenerator(**SMALL_G), BigGANDiscriminator(**SMALL_D)
    for model in (G, D):
        layers = _sn_layers(model)
        assert layers
        for m in layers:
            assert dict(m.named_buffers()).keys() == {'u0', 'sv0'}
            assert m.u0.shape == (1, m.weight.shape[0]) and m.sv0.shape == (1,)
            assert {n for n, _ in m.named_parameters()} <= {'weight', 'bias'}
    plain_g = BigGANGenerator(**SMALL_G, with_spectral_norm=False)
    plain_d = BigGANDiscriminator(**SMALL_D, with_spectral_norm=False)
    torch_g = BigGANGenerator(**SMALL_G, sn_style='torch')
    assert not _sn_layers(plain_g)
    assert n_params(plain_g) == n_params(G) == n_params(torch_g)
    assert n_params(plain_d) == n_params(D)
    assert [n for n, _ in plain_g.named_parameters()] == [n for n, _ in G.named_parameters()]
    assert torch_g(num_batches=2).shape == (2, 3, 32, 32)


def test_power_iteration_updates_only_in_training():
    layer = SNLinear(40, 30, eps=1e-6)
    with torch.no_grad():  # known singular values with a clear gap: 3, then <= 1
        u, _, vh = torch.linalg.svd(torch.randn(30, 40), full_matrices=False)
        s = torch.linspace(1.0, 0.1, 30)
        s[0] = 3.0
        layer.weight.copy_(u @ torch.diag(s) @ vh)
    x = torch.randn(5, 40)
    layer.eval()
    u_before = layer.u0.clone()
    out_eval = layer(x)
    assert torch.equal(layer.u0, u_before) and torch.equal(layer.sv0, torch.ones(1))
    assert torch.equal(layer(x), out_eval)  # evaluation is a pure function of the weights
    layer.train()
    for _ in range(30):
        layer(x)
    assert not torch.equal(layer.u0, u_before)
    assert layer.sv0.item() == pytest.approx(3.0, rel=1e-4)
    w_sn = layer.normalized_weight().detach()
    assert torch.linalg.matrix_norm(w_sn, ord=2).item() == pytest.approx(1.0, rel=1e-4)


def test_sn_conv_and_embedding_normalise_their_weight():
    conv, emb = SNConv2d(6, 8, 3, padding=1), SNEmbedding(12, 5)
    for m in (conv, emb):
        for _ in range(300):
            w = m.normalized_weight()
        mat = w.detach().reshape(w.shape[0], -1)
        assert torch.linalg.matrix_norm(mat, ord=2).item() == pytest.approx(1.0, rel=1e-2)
    assert conv(torch.randn(2, 6, 5, 5)).shape == (2, 8, 5, 5)
    assert emb(torch.tensor([0, 11])).shape == (2, 5)


# ------------------------------------------------------------------------------- gradients


def _hinge_losses(G, D, batch=4, num_classes=10, size=32):
    labels = torch.randint(0, num_classes, (batch,))
    real = torch.rand(batch, 3, size, size) * 2 - 1
    fake = G(num_batches=batch, label=labels)
    loss_d = F.relu(1 - D(real, labels)).mean() + F.relu(1 + D(fake, labels)).mean()
    loss_g = -D(fake, labels).mean()
    return loss_d + loss_g


def test_gradients_reach_every_parameter_32():
    G, D = BigGANGenerator(**SMALL_G), BigGANDiscriminator(**SMALL_D)
    _hinge_losses(G, D).backward()
    for model in (G, D):
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_gradients_through_attention_64():
    G = BigGANGenerator(output_scale=64, base_channels=8, num_classes=10, shared_dim=16)
    D = BigGANDiscriminator(input_scale=64, base_channels=8, num_classes=10)
    _hinge_losses(G, D, batch=2, size=64).backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    attn = next(m for m in G.conv_blocks if isinstance(m, SelfAttentionBlock))
    assert attn.gamma.item() == 0.0 and attn.gamma.grad.abs() > 0  # gate starts closed


# -------------------------------------------------------------------------- initialisation


def test_orthogonal_init():
    G = BigGANGenerator(**SMALL_G)
    w = G.conv_blocks[1].conv2.conv.weight.detach()
    mat = w.reshape(w.shape[0], -1)          # 64 x 576: orthonormal rows
    assert torch.allclose(mat @ mat.t(), torch.eye(mat.shape[0]), atol=1e-4)
    tall = G.noise2feat.weight.detach()      # 1024 x 30: orthonormal columns
    assert torch.allclose(tall.t() @ tall, torch.eye(tall.shape[1]), atol=1e-4)
    emb = G.shared_embedding.weight.detach()  # 10 x 32
    assert torch.allclose(emb @ emb.t(), torch.eye(10), atol=1e-4)


@pytest.mark.parametrize('shape', [(64, 16, 3, 3), (300, 20), (50, 50), (20, 300)])
def test_orthogonal_matches_torch(shape):
    torch.manual_seed(3)
    ref = nn.init.orthogonal_(torch.empty(shape))
    torch.manual_seed(3)
    ours = orthogonal_(torch.empty(shape))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_other_init_types():
    G = BigGANGenerator(**SMALL_G, init_type='N02')
    w = G.conv_blocks[0].conv1.conv.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(G.conv_blocks[0].conv1.conv.bias) == 0
    D = BigGANDiscriminator(**SMALL_D, init_type='xavier')
    assert D(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])).shape == (2, 1)


def test_init_weights_and_pretrained(tmp_path):
    G = BigGANGenerator(**SMALL_G)
    assert G.is_init  # a Runner's init_weights() leaves the constructed weights alone
    before = G.noise2feat.weight.detach().clone()
    G.init_weights()
    assert not torch.equal(before, G.noise2feat.weight)
    path = tmp_path / 'g.pth'
    torch.save(G.state_dict(), path)
    H = BigGANGenerator(**SMALL_G, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    assert not H.is_init
    H.init_weights()
    for k, v in G.state_dict().items():
        assert torch.equal(v, H.state_dict()[k]), k


# ------------------------------------------------------------- train/eval, BN, determinism


def test_train_and_eval_modes():
    G = BigGANGenerator(**SMALL_G)
    bn = G.conv_blocks[0].bn1.bn
    assert type(bn) is nn.BatchNorm2d  # auto_sync_bn only converts under torch.distributed
    G.train()
    G(num_batches=4)
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    G.eval()
    z, y = torch.randn(1, 120), torch.tensor([7])
    first = G(z, y)  # batch of one works on running statistics
    assert torch.equal(first, G(z, y)) and bn.num_batches_tracked.item() == 1
    auto = BigGANGenerator(**{**SMALL_G, 'auto_sync_bn': True})
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in auto.modules())


def test_discriminator_inplace_activation_keeps_shortcut_input():
    torch.manual_seed(1)
    D_inplace = BigGANDiscriminator(**SMALL_D)
    D_plain = BigGANDiscriminator(**{**SMALL_D, 'act_cfg': dict(type='ReLU')})
    D_plain.load_state_dict(D_inplace.state_dict())
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    x_copy = x.clone()
    assert torch.allclose(D_inplace(x, y), D_plain(x, y), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_copy)


def test_determinism_with_fixed_seed():
    def run():
        torch.manual_seed(123)
        G, D = BigGANGenerator(**SMALL_G), BigGANDiscriminator(**SMALL_D)
        img = G(num_batches=2)
        return G.state_dict(), img, D(img, torch.tensor([0, 1]))

    (sd1, img1, out1), (sd2, img2, out2) = run(), run()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert torch.equal(img1, img2) and torch.equal(out1, out2)
