"""MultiOptimWrapperConstructor built through MMEngine's own builder and Runner.

After ``import pygan_optim`` the MMagic GAN config (``constructor=
'MultiOptimWrapperConstructor'``) must build with plain MMEngine (no mmagic,
no default_scope): an ``mmengine.optim.OptimWrapperDict`` with one wrapper per
submodule, the fused classes by their registered names, ``.module``
unwrapping, per-key ``paramwise_cfg``, ``modules`` selections, errors that
name the culprit, and a few iterations of ``mmengine.runner.Runner``.
"""
import copy
from collections import OrderedDict

import mmengine.optim as mmo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.optim import DefaultOptimWrapperConstructor, build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader

import pygan_optim
from pygan_optim import FusedAdam, FusedAdamW

NZ = 8
IMG = 12

SEED_CFG = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999), eps=1e-6)),
    discriminator=dict(optimizer=dict(type='Adam', lr=0.0004, betas=(0.0, 0.999), eps=1e-6)))

HP = {'generator': dict(lr=0.0002, betas=(0.0, 0.999), eps=1e-6),
      'discriminator': dict(lr=0.0004, betas=(0.0, 0.999), eps=1e-6)}


def make_generator():
    return nn.Sequential(OrderedDict(fc=nn.Linear(NZ, 16), act=nn.LeakyReLU(0.2),
                                     out=nn.Linear(16, IMG)))


def make_discriminator():
    body = nn.Sequential(OrderedDict(fc=nn.Linear(IMG, 16), act=nn.LeakyReLU(0.2)))
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(16, 1)))


class TinyGAN(BaseModel):
    """G, D and a third submodule no optimizer config names."""

    def __init__(self):
        super().__init__()
        self.generator = make_generator()
        self.discriminator = make_discriminator()
        self.embedding = nn.Embedding(4, 3)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.generator(inputs)

    def train_step(self, data, optim_wrapper):
        """D then G, as MMagic's BaseGAN does (fakes detached, D frozen for G)."""
        real = data
        dw, gw = optim_wrapper['discriminator'], optim_wrapper['generator']
        z = torch.randn(real.shape[0], NZ)
        with dw.optim_context(self.discriminator):
            fake = self.generator(z).detach()
            loss_d = (F.softplus(-self.discriminator(real)).mean()
                      + F.softplus(self.discriminator(fake)).mean())
            dw.update_params(loss_d)
        self.discriminator.requires_grad_(False)
        try:
            with gw.optim_context(self.generator):
                loss_g = F.softplus(-self.discriminator(self.generator(z))).mean()
                gw.update_params(loss_g)
        finally:
            self.discriminator.requires_grad_(True)
        return dict(loss_d=loss_d.detach().float(), loss_g=loss_g.detach().float())


class Holder(nn.Module):
    """A model wrapper in the style of (MM)DistributedDataParallel: the model is `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def ids(params):
    return [id(p) for p in params]


def wrapper_params(w):
    return [p for g in w.optimizer.param_groups for p in g['params']]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyGAN()


# ---- the seed config -------------------------------------------------------------------

def test_seed_config_builds_optim_wrapper_dict(model):
    cfg = copy.deepcopy(SEED_CFG)
    w = build_optim_wrapper(model, cfg)
    assert cfg == SEED_CFG  # the user's config is left alone
    assert isinstance(w, mmo.OptimWrapperDict)
    assert pygan_optim.OptimWrapperDict is mmo.OptimWrapperDict
    assert list(w.keys()) == ['generator', 'discriminator']
    for key, hp in HP.items():
        sub = w[key]
        assert type(sub) is mmo.OptimWrapper  # the default wrapper type is MMEngine's
        assert type(sub.optimizer) is torch.optim.Adam
        (group,) = sub.optimizer.param_groups
        assert group['lr'] == hp['lr'] and tuple(group['betas']) == hp['betas']
        assert group['eps'] == hp['eps'] and group['weight_decay'] == 0
        # Exactly the submodule's parameters, in order, nothing else.
        assert ids(group['params']) == ids(getattr(model, key).parameters())
    assert w.get_lr() == {'generator.lr': [0.0002], 'discriminator.lr': [0.0004]}
    assert set(w.state_dict()) == {'generator', 'discriminator'}
    emb = ids(model.embedding.parameters())
    assert not set(emb) & set(ids(wrapper_params(w['generator'])) + ids(wrapper_params(
        w['discriminator'])))


def test_seed_config_matches_default_constructor_per_submodule(model):
    """Each wrapper is what MMEngine's DefaultOptimWrapperConstructor builds for that submodule."""
    w = build_optim_wrapper(model, copy.deepcopy(SEED_CFG))
    for key in HP:
        ref = DefaultOptimWrapperConstructor(
            dict(optimizer=copy.deepcopy(SEED_CFG[key]['optimizer'])))(getattr(model, key))
        assert w[key].optimizer.state_dict() == ref.optimizer.state_dict()
        assert type(w[key]) is type(ref)


# ---- the fused variant ----------------------------------------------------------------------

@pytest.mark.parametrize('loss_scale',
                         ['dynamic', 512.0, dict(init_scale=256.0, growth_interval=7)],
                         ids=['dynamic', 'static', 'dict'])
def test_fused_config_builds_our_classes(model, loss_scale):
    cfg = dict(
        constructor='MultiOptimWrapperConstructor',
        generator=dict(type='FusedOptimWrapper', accumulative_counts=4,
                       clip_grad=dict(max_norm=1.0),
                       optimizer=dict(type='FusedAdam', lr=0.0002, betas=(0.0, 0.999), eps=1e-6)),
        discriminator=dict(type='FusedAmpOptimWrapper', accumulative_counts=2,
                           clip_grad=dict(type='value', clip_value=0.5), dtype='bfloat16',
                           loss_scale=loss_scale,
                           optimizer=dict(type='FusedAdamW', lr=0.0004, betas=(0.0, 0.999),
                                          eps=1e-6, weight_decay=0.01)))
    w = build_optim_wrapper(model, cfg)
    assert isinstance(w, mmo.OptimWrapperDict)
    gw, dw = w['generator'], w['discriminator']
    assert isinstance(gw, pygan_optim.OptimWrapper) and isinstance(gw, mmo.OptimWrapper)
    assert not isinstance(gw, mmo.AmpOptimWrapper)
    assert isinstance(dw, pygan_optim.AmpOptimWrapper) and isinstance(dw, mmo.AmpOptimWrapper)
    assert type(gw.optimizer) is FusedAdam and type(dw.optimizer) is FusedAdamW
    assert ids(wrapper_params(gw)) == ids(model.generator.parameters())
    assert ids(wrapper_params(dw)) == ids(model.discriminator.parameters())
    (gg,) = gw.optimizer.param_groups
    assert (gg['lr'], tuple(gg['betas']), gg['eps']) == (0.0002, (0.0, 0.999), 1e-6)
    (dg,) = dw.optimizer.param_groups
    assert (dg['lr'], dg['weight_decay'], dg['decoupled_weight_decay']) == (0.0004, 0.01, True)
    assert gw._accumulative_counts == 4 and dw._accumulative_counts == 2
    assert gw.clip_grad_kwargs == dict(max_norm=1.0) and gw.grad_name == 'grad_norm'
    assert dw.clip_grad_kwargs == dict(clip_value=0.5) and dw.grad_name == 'grad_value'
    assert dw.cast_dtype == torch.bfloat16
    if loss_scale == 'dynamic':
        assert dw._scale_update_param is None and dw.loss_scaler.get_scale() == 2.0 ** 16
    elif isinstance(loss_scale, float):
        assert dw._scale_update_param == 512.0 and dw.loss_scaler.get_scale() == 512.0
    else:
        assert dw._scale_update_param is None
        assert dw.loss_scaler.get_scale() == 256.0
        assert dw.loss_scaler.state_dict()['growth_interval'] == 7
    assert 'loss_scaler' in w.state_dict()['discriminator']
    assert 'loss_scaler' not in w.state_dict()['generator']
    # The built wrappers train: a few D/G iterations move both networks.
    before = copy.deepcopy(model.state_dict())
    for _ in range(4):
        model.train_step(torch.randn(2, IMG), w)
    for k in ('generator.out.weight', 'discriminator.head.weight'):
        assert not torch.equal(before[k], model.state_dict()[k]), k


# ---- model wrappers --------------------------------------------------------------------

def test_module_attribute_is_unwrapped(model):
    w = build_optim_wrapper(Holder(model), copy.deepcopy(SEED_CFG))
    assert list(w.keys()) == ['generator', 'discriminator']
    for key in HP:
        assert ids(wrapper_params(w[key])) == ids(getattr(model, key).parameters())


def test_real_ddp_is_unwrapped(model, tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        w = build_optim_wrapper(ddp, copy.deepcopy(SEED_CFG))
        for key in HP:
            assert ids(wrapper_params(w[key])) == ids(getattr(model, key).parameters())
    finally:
        dist.destroy_process_group()


# ---- paramwise_cfg, single optimizer, modules ----------------------------------------------

def test_per_submodule_paramwise_cfg(model):
    cfg = dict(
        constructor='MultiOptimWrapperConstructor',
        generator=dict(optimizer=dict(type='Adam', lr=1e-3, weight_decay=1e-4),
                       paramwise_cfg=dict(custom_keys={'out': dict(lr_mult=0.1, decay_mult=0.0)})),
        discriminator=dict(optimizer=dict(type='Adam', lr=4e-3)))
    w = build_optim_wrapper(model, cfg)
    g_groups = w['generator'].optimizer.param_groups
    assert len(g_groups) == 4  # one group per parameter
    by_param = {id(g['params'][0]): g for g in g_groups}
    for name, p in model.generator.named_parameters():
        g = by_param[id(p)]
        if name.startswith('out.'):
            assert g['lr'] == pytest.approx(1e-4) and g['weight_decay'] == 0.0, name
            assert g['lr_mult'] == 0.1, name
        else:
            assert g['lr'] == 1e-3 and g['weight_decay'] == 1e-4, name
    # Applies to that key only.
    (d_group,) = w['discriminator'].optimizer.param_groups
    assert d_group['lr'] == 4e-3 and 'lr_mult' not in d_group
    # MMEngine's multi-group conventions follow: a fake base group and base_lr.
    assert w.get_lr()['generator.base_lr'] == [1e-3]
    assert len(w['generator'].param_groups) == 5
    ref = DefaultOptimWrapperConstructor(
        dict(optimizer=dict(type='Adam', lr=1e-3, weight_decay=1e-4)),
        dict(custom_keys={'out': dict(lr_mult=0.1, decay_mult=0.0)}))(model.generator)
    assert w['generator'].optimizer.state_dict() == ref.optimizer.state_dict()


def test_single_top_level_optimizer_covers_whole_model(model):
    cfg = dict(constructor='MultiOptimWrapperConstructor',
               optimizer=dict(type='Adam', lr=1e-3), accumulative_counts=2)
    w = build_optim_wrapper(model, cfg)
    assert isinstance(w, mmo.OptimWrapper) and not isinstance(w, mmo.OptimWrapperDict)
    assert w._accumulative_counts == 2
    assert ids(wrapper_params(w)) == ids(model.parameters())
    assert w.optimizer.param_groups[0]['lr'] == 1e-3


def test_single_optimizer_over_selected_modules(model):
    """MMagic's mode A: one optimizer over the modules listed (names or regexes)."""
    cfg = dict(constructor='MultiOptimWrapperConstructor',
               modules=['generator', r'discriminator\.h.*'],
               optimizer=dict(type='Adam', lr=1e-3), accumulative_counts=4)
    w = build_optim_wrapper(model, cfg)
    assert isinstance(w, mmo.OptimWrapper) and not isinstance(w, mmo.OptimWrapperDict)
    assert w._accumulative_counts == 4
    assert ids(wrapper_params(w)) == ids(list(model.generator.parameters())
                                         + list(model.discriminator.head.parameters()))


def test_modules_regex_selects_nested_modules(model):
    cfg = dict(
        constructor='MultiOptimWrapperConstructor',
        generator=dict(optimizer=dict(type='Adam', lr=1e-3)),
        disc_body=dict(modules=r'discriminator\.body\.f.*', optimizer=dict(type='Adam', lr=2e-3)),
        disc_head=dict(modules='discriminator.head', type='FusedOptimWrapper',
                       optimizer=dict(type='FusedAdam', lr=3e-3)),
        heads=dict(modules=[r'.*\.out', r'.*\.head'], optimizer=dict(type='SGD', lr=0.1)))
    w = build_optim_wrapper(model, cfg)
    assert list(w.keys()) == ['generator', 'disc_body', 'disc_head', 'heads']
    assert ids(wrapper_params(w['generator'])) == ids(model.generator.parameters())
    assert ids(wrapper_params(w['disc_body'])) == ids(model.discriminator.body.fc.parameters())
    assert ids(wrapper_params(w['disc_head'])) == ids(model.discriminator.head.parameters())
    assert ids(wrapper_params(w['heads'])) == ids(list(model.generator.out.parameters())
                                                  + list(model.discriminator.head.parameters()))
    assert type(w['disc_head']) is pygan_optim.OptimWrapper
    assert type(w['disc_head'].optimizer) is FusedAdam
    assert type(w['heads'].optimizer) is torch.optim.SGD
    assert w.get_lr() == {'generator.lr': [1e-3], 'disc_body.lr': [2e-3],
                          'disc_head.lr': [3e-3], 'heads.lr': [0.1]}


# ---- errors -------------------------------------------------------------------------

def test_key_naming_a_missing_submodule(model):
    cfg = copy.deepcopy(SEED_CFG)
    cfg['critic'] = dict(optimizer=dict(type='Adam', lr=1e-3))
    with pytest.raises((KeyError, ValueError), match='critic'):
        build_optim_wrapper(model, cfg)


def test_modules_regex_matching_nothing(model):
    cfg = dict(constructor='MultiOptimWrapperConstructor',
               generator=dict(modules=r'gen\.nothing.*', optimizer=dict(type='Adam')))
    with pytest.raises((KeyError, ValueError), match='nothing'):
        build_optim_wrapper(model, cfg)


def test_unknown_optimizer_type(model):
    cfg = copy.deepcopy(SEED_CFG)
    cfg['discriminator']['optimizer']['type'] = 'FusedAdamm'
    with pytest.raises((KeyError, TypeError), match='FusedAdamm'):
        build_optim_wrapper(model, cfg)


def test_unknown_wrapper_type(model):
    cfg = copy.deepcopy(SEED_CFG)
    cfg['generator']['type'] = 'FusedOptimWraper'
    with pytest.raises(KeyError, match='FusedOptimWraper'):
        build_optim_wrapper(model, cfg)


def test_non_dict_cfg_is_a_type_error(model):
    with pytest.raises(TypeError, match='dict'):
        pygan_optim.MultiOptimWrapperConstructor([('generator', {})])
    with pytest.raises(TypeError, match='dict'):
        OPTIM_WRAPPER_CONSTRUCTORS.build(dict(type='MultiOptimWrapperConstructor',
                                              optim_wrapper_cfg='generator'))
    # A key whose value is not a wrapper config: named in the error.
    cfg = copy.deepcopy(SEED_CFG)
    cfg['generator'] = 0.0002
    with pytest.raises(TypeError, match='generator'):
        build_optim_wrapper(model, cfg)


def test_top_level_paramwise_cfg_is_an_assertion_error(model):
    cfg = copy.deepcopy(SEED_CFG)
    cfg['paramwise_cfg'] = dict(custom_keys={'out': dict(lr_mult=0.1)})
    with pytest.raises(AssertionError, match='paramwise_cfg'):
        build_optim_wrapper(model, cfg)


def test_paramwise_cfg_with_modules_selection_is_an_assertion_error(model):
    cfg = dict(constructor='MultiOptimWrapperConstructor',
               heads=dict(modules=[r'.*\.out', r'.*\.head'], optimizer=dict(type='Adam'),
                          paramwise_cfg=dict(custom_keys={'out': dict(lr_mult=0.1)})))
    with pytest.raises(AssertionError, match='paramwise_cfg'):
        build_optim_wrapper(model, cfg)


def test_key_without_optimizer(model):
    cfg = copy.deepcopy(SEED_CFG)
    cfg['generator'] = dict(type='OptimWrapper', lr=1e-3)
    with pytest.raises((KeyError, AssertionError), match='generator|optimizer'):
        build_optim_wrapper(model, cfg)


# ---- MMEngine's Runner ------------------------------------------------------------------

FUSED_CFG = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(type='FusedOptimWrapper', clip_grad=dict(max_norm=10.0),
                   optimizer=dict(type='FusedAdam', lr=0.0002, betas=(0.0, 0.999), eps=1e-6)),
    discriminator=dict(type='FusedAmpOptimWrapper', dtype='bfloat16', loss_scale='dynamic',
                       optimizer=dict(type='FusedAdam', lr=0.0004, betas=(0.0, 0.999),
                                      eps=1e-6)))


def make_runner(tmp_path, name, optim_wrapper, max_iters, **kw):
    torch.manual_seed(0)
    data = [torch.randn(IMG) for _ in range(8)]
    return Runner(
        model=TinyGAN(), work_dir=str(tmp_path), experiment_name=name,
        train_dataloader=DataLoader(data, batch_size=2, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=copy.deepcopy(optim_wrapper),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=max_iters,
                                           by_epoch=False),
                           logger=dict(type='LoggerHook', interval=100)),
        launcher='none', env_cfg=dict(dist_cfg=dict(backend='gloo')),
        randomness=dict(seed=0), **kw)


def check_checkpoint(ckpt, model, n_steps, amp_key):
    assert set(ckpt['optimizer']) == {'generator', 'discriminator'}
    for key, hp in HP.items():
        sd = ckpt['optimizer'][key]
        n_params = len(list(getattr(model, key).parameters()))
        assert len(sd['state']) == n_params, key
        assert {int(s['step']) for s in sd['state'].values()} == {n_steps}, key
        (group,) = sd['param_groups']
        assert group['lr'] == hp['lr'] and tuple(group['betas']) == hp['betas'], key
        assert ('loss_scaler' in sd) == (key == amp_key), key


@pytest.mark.parametrize('variant', ['seed', 'fused'])
def test_runner_trains_and_checkpoints_both_optimizers(variant, tmp_path, monkeypatch):
    cfg, amp_key = (SEED_CFG, None) if variant == 'seed' else (FUSED_CFG, 'discriminator')
    runner = make_runner(tmp_path, f'gan_{variant}_{tmp_path.name}', cfg, 4)
    init = copy.deepcopy(runner.model.state_dict())
    runner.train()
    assert isinstance(runner.optim_wrapper, mmo.OptimWrapperDict)
    if variant == 'fused':
        assert isinstance(runner.optim_wrapper['generator'], pygan_optim.OptimWrapper)
        assert isinstance(runner.optim_wrapper['discriminator'], pygan_optim.AmpOptimWrapper)
    # RuntimeInfoHook logged both wrappers' lr through OptimWrapperDict.get_lr().
    hub = runner.message_hub
    assert hub.get_scalar('train/generator.lr').current() == 0.0002
    assert hub.get_scalar('train/discriminator.lr').current() == 0.0004
    ckpt = torch.load(tmp_path / 'iter_4.pth', map_location='cpu', weights_only=False)
    check_checkpoint(ckpt, runner.model, 4, amp_key)
    for k in ('generator.out.weight', 'discriminator.head.weight'):
        assert not torch.equal(init[k], ckpt['state_dict'][k]), k
        assert torch.equal(ckpt['state_dict'][k], runner.model.state_dict()[k])
    if variant == 'fused':
        # Resume with the Runner: our wrappers load the checkpoint and go on.
        # (MMEngine 0.10.7 resumes with torch.load's default, weights_only=True
        # since torch 2.6, which refuses its own checkpoints; torch's documented
        # switch restores the old default for this test.)
        monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
        resumed = make_runner(tmp_path, f'gan_resume_{tmp_path.name}', cfg, 6,
                              resume=True, load_from=str(tmp_path / 'iter_4.pth'))
        resumed.train()
        ckpt6 = torch.load(tmp_path / 'iter_6.pth', map_location='cpu', weights_only=False)
        check_checkpoint(ckpt6, resumed.model, 6, amp_key)
        assert (ckpt6['optimizer']['discriminator']['loss_scaler']['scale']
                == ckpt['optimizer']['discriminator']['loss_scaler']['scale'])
