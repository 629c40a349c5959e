"""MultiOptimWrapperConstructor against MMEngine's own constructor machinery.

Oracle: MMEngine 0.10.7's ``DefaultOptimWrapperConstructor`` / ``build_optim_wrapper``
(what one wrapper over the same parameters is), and torch's Adam semantics (one
update per parameter per step).
"""
from collections import OrderedDict

import pytest
import torch
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper, build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS, DefaultScope, Registry
from torch import nn

import pygan_optim  # noqa: F401  (registers the constructor and FusedAdam)

SCOPE = 'pygan_constructor_hunt'  # a downstream project's scope, unique to this file
HUNT_OPTIMIZERS = Registry('optimizer', parent=OPTIMIZERS, scope=SCOPE)
HUNT_WRAPPERS = Registry('optim_wrapper', parent=OPTIM_WRAPPERS, scope=SCOPE)


@HUNT_OPTIMIZERS.register_module()
class HuntAdam(torch.optim.Adam):
    """A project's own optimizer, registered in its child registry only."""


@HUNT_WRAPPERS.register_module()
class HuntOptimWrapper(OptimWrapper):
    """A project's own wrapper, registered in its child registry only."""


class TinyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(OrderedDict(fc=nn.Linear(4, 8), out=nn.Linear(8, 4)))
        self.discriminator = nn.Sequential(OrderedDict(body=nn.Sequential(
            OrderedDict(fc=nn.Linear(4, 8), act=nn.Tanh())), head=nn.Linear(8, 1)))


def ids(params):
    return [id(p) for p in params]


def wrapper_params(w):
    return [p for g in w.optimizer.param_groups for p in g['params']]


@pytest.mark.parametrize('opt', ['Adam', 'FusedAdam'])
@pytest.mark.parametrize('modules', [r'discriminator.*', ['discriminator', r'discriminator\.head']],
                         ids=['regex', 'overlapping_list'])
def test_modules_selection_gives_each_parameter_once(opt, modules):
    """A selection whose matches nest ('discriminator' and its submodules) is
    one optimizer over the discriminator's parameters, each once, as MMEngine's
    constructor builds it over the submodule: before the fix each parameter was
    listed once per matching module, so torch's Adam updated it several times
    per step (step count 3 after one update) and FusedAdam refused to step."""
    torch.manual_seed(0)
    model = TinyGAN()
    ref_model = TinyGAN()
    ref_model.load_state_dict(model.state_dict())
    cfg = dict(constructor='MultiOptimWrapperConstructor',
               discriminator=dict(modules=modules, optimizer=dict(type=opt, lr=1e-2)))
    w = build_optim_wrapper(model, cfg)['discriminator']
    assert ids(wrapper_params(w)) == ids(model.discriminator.parameters())
    ref = DefaultOptimWrapperConstructor(dict(optimizer=dict(type=opt, lr=1e-2)))(
        ref_model.discriminator)
    x = torch.randn(3, 4)
    for net, wrapper in ((model, w), (ref_model, ref)):
        wrapper.update_params(net.discriminator(x).pow(2).mean())
    for p in model.discriminator.parameters():
        assert int(w.optimizer.state[p]['step']) == 1
    for p, q in zip(model.discriminator.parameters(), ref_model.discriminator.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize('what', ['optimizer', 'wrapper'])
def test_types_registered_in_the_default_scope_build(what):
    """MMEngine builds optimizers and wrappers in the registry of the current
    default scope (a downstream project's child registry); its
    DefaultOptimWrapperConstructor finds them there. Before the fix our
    constructor looked them up in the root registry only and raised
    'unknown optimizer type' for a type MMEngine builds."""
    cfg = (dict(optimizer=dict(type='HuntAdam', lr=1e-3)) if what == 'optimizer'
           else dict(type='HuntOptimWrapper', optimizer=dict(type='Adam', lr=1e-3)))
    with DefaultScope.overwrite_default_scope(SCOPE):
        ref = build_optim_wrapper(TinyGAN().generator, dict(cfg))  # MMEngine's own path
        w = build_optim_wrapper(TinyGAN(), dict(constructor='MultiOptimWrapperConstructor',
                                                generator=dict(cfg)))['generator']
    assert type(w) is type(ref)
    assert type(w.optimizer) is type(ref.optimizer)
    assert (type(ref).__name__, type(ref.optimizer).__name__) == (
        ('OptimWrapper', 'HuntAdam') if what == 'optimizer' else ('HuntOptimWrapper', 'Adam'))


def test_top_level_modules_without_optimizer_names_the_missing_optimizer():
    """A top-level 'modules' is MMagic's one-optimizer form: without an
    'optimizer' beside it, the error is that one is missing (MMagic/MMEngine:
    '`optim_wrapper_cfg` must contain "optimizer" config'). Before the fix the
    config was read as a dict of wrappers and 'modules' blamed as a wrapper
    config that is not a dict (TypeError)."""
    cfg = dict(constructor='MultiOptimWrapperConstructor', modules=['generator'],
               optimzer=dict(type='Adam', lr=1e-3))  # the typo a user makes
    with pytest.raises((KeyError, AssertionError), match='optimizer'):
        build_optim_wrapper(TinyGAN(), cfg)
