"""MMGeneration 0.x checkpoint -> MMEngine 1.x (pygan_optim.migrate.checkpoint and
``pygan-optim migrate --checkpoint``).

The 0.x checkpoint is made here the way MMGeneration 0.7.3 made one: a BasiccGAN-like
module with ``generator``, ``discriminator`` and ``generator_ema`` (a deepcopy of the
generator, blended by the ExponentialMovingAverageHook's ``lerp``), trained for a few
iterations with 0.x's D/G schedule (``disc_steps``, ``batch_accumulation_steps``) and
``torch.optim.Adam``, saved as ``{'meta', 'state_dict', 'optimizer'}`` with the
optimizer state_dicts rewritten into torch 1.x's layout (Python-int ``step``, param
groups with only lr/betas/eps/weight_decay/amsgrad/params) and the 0.x config text in
``meta['config']`` (mmgen/core/runners/checkpoint.py, tools/train.py).
"""
import copy
import os
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import MODELS
from mmengine.runner import Runner

import pygan_optim
from pygan_optim import cli, migrate_cli
from pygan_optim.migrate import migrate
from pygan_optim.migrate.checkpoint import (CheckpointConversionError, convert_checkpoint,
                                            ema_steps_for, load_checkpoint_file)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# A 0.x BigGAN config at CPU-test size: D0 = 2 iterations per G update, accumulation 2,
# EMA hook from iteration 2 every 2 iterations (-> 1.x: discriminator_steps 1,
# accumulative_counts 2, ema interval 1, start_iter 1, momentum 0.001).
OLD_CONFIG = """
model = dict(
    type='BasiccGAN',
    generator=dict(type='BigGANGenerator', output_scale=32, noise_size=120, num_classes=10,
                   base_channels=16, shared_dim=32, with_shared_embedding=True, sn_eps=1e-6,
                   init_type='ortho', act_cfg=dict(type='ReLU', inplace=True),
                   split_noise=True, auto_sync_bn=False),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10,
                       base_channels=16, sn_eps=1e-6, init_type='ortho',
                       act_cfg=dict(type='ReLU', inplace=True), with_spectral_norm=True),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=2, gen_steps=1, batch_accumulation_steps=2, use_ema=True)
test_cfg = None
optimizer = dict(
    generator=dict(type='Adam', lr=0.0001, betas=(0.5, 0.999), eps=1e-6),
    discriminator=dict(type='Adam', lr=0.0004, betas=(0.0, 0.999), eps=1e-6))
custom_hooks = [
    dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema', ), interval=2,
         start_iter=2, interp_cfg=dict(momentum=0.999, momentum_nontrainable=0.999),
         priority='VERY_HIGH')]
lr_config = None
total_iters = 8
gpu_ids = range(0, 1)
"""
ITERS = 4  # the 0.x run stopped here: meta['iter'] (iterations done)
D0, BAS, EMA_START, EMA_INTERVAL, EMA_M = 2, 2, 2, 2, 0.999
TORCH1_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")


class _GAN0x(nn.Module):
    """The state-holding part of 0.x's BasiccGAN (gan_loss has no state)."""

    def __init__(self, cfg):
        super().__init__()
        self.generator = MODELS.build(copy.deepcopy(cfg.model.generator))
        self.discriminator = MODELS.build(copy.deepcopy(cfg.model.discriminator))
        self.generator_ema = copy.deepcopy(self.generator)  # train_cfg.use_ema


def _ema_hook_0x(model, it):
    """ExponentialMovingAverageHook.after_train_iter (mmgen/core/hooks/ema_hook.py)."""
    if it >= EMA_START and (it + 1 - EMA_START) % EMA_INTERVAL != 0:
        return
    ema = model.generator_ema.state_dict(keep_vars=False)
    for k, v in model.generator.state_dict(keep_vars=True).items():
        if it < EMA_START:
            ema[k].data.copy_(v.data)
        else:  # lerp(orig, ema, m): the same m for buffers (momentum_nontrainable)
            ema[k] = (v + (ema[k] - v) * EMA_M).detach()
    model.generator_ema.load_state_dict(ema, strict=True)


def _train_0x(model, optims, iters):
    """BasiccGAN.train_step's schedule with hinge losses (mmgen basic_conditional_gan.py)."""
    g, d = model.generator, model.discriminator
    for it in range(iters):
        real = torch.randn(2, 3, 32, 32)
        labels = torch.randint(0, 10, (2,))
        d.requires_grad_(True)
        if it % BAS == 0:
            optims["discriminator"].zero_grad()
        with torch.no_grad():
            fake = g(torch.randn(2, 120), label=labels)
        loss_d = F.relu(1 + d(fake, label=labels)).mean() + F.relu(1 - d(real, label=labels)).mean()
        (loss_d / BAS).backward()
        if (it + 1) % BAS == 0:
            optims["discriminator"].step()
        if (it + 1) % D0 == 0:
            d.requires_grad_(False)
            optims["generator"].zero_grad()
            for _ in range(BAS):
                y = torch.randint(0, 10, (2,))
                loss_g = -d(g(torch.randn(2, 120), label=y), label=y).mean()
                (loss_g / BAS).backward()
            optims["generator"].step()
        _ema_hook_0x(model, it)


def _torch1_layout(osd):
    """A torch>=2 Adam state_dict as torch 1.x (< 1.12) saved it."""
    out = copy.deepcopy(osd)
    for s in out["state"].values():
        s["step"] = int(s["step"].item())
    out["param_groups"] = [{k: g[k] for k in TORCH1_GROUP_KEYS} for g in out["param_groups"]]
    return out


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """(path of the 0.x config, path of the 0.x checkpoint, the checkpoint dict)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("mmgen0x")
    cfg_path = root / "biggan_tiny_0x.py"
    cfg_path.write_text(textwrap.dedent(OLD_CONFIG))
    cfg = Config.fromfile(str(cfg_path))
    model = _GAN0x(cfg).train()
    optims = {name: torch.optim.Adam(getattr(model, name).parameters(),
                                     **{k: v for k, v in cfg.optimizer[name].items()
                                        if k != "type"})
              for name in ("generator", "discriminator")}
    _train_0x(model, optims, ITERS)
    meta = dict(env_info="sys.platform: linux", config=cfg.pretty_text, seed=0,
                exp_name="biggan_tiny_0x.py", mmgen_version="0.7.3", iter=ITERS, epoch=1,
                mmcv_version="1.7.2", time="Mon Dec  1 10:00:00 2025",
                hook_msgs=dict(last_ckpt="work_dirs/x/iter_4.pth",
                               best_score=np.float64(12.5)))
    ckpt = dict(meta=meta, state_dict=model.state_dict(),
                optimizer={k: _torch1_layout(o.state_dict()) for k, o in optims.items()})
    path = root / "iter_4.pth"
    torch.save(ckpt, str(path))
    return str(cfg_path), str(path), torch.load(str(path), weights_only=False)


def _resume_cfg(old_cfg_path, work_dir, load_from):
    """The migrated 1.x config, FusedAdam in the wrappers, plus the tiny config's runtime."""
    new = migrate(old_cfg_path).config
    tiny = Config.fromfile(os.path.join(CONFIGS, "biggan_32x32_tiny.py"))
    optim_wrapper = copy.deepcopy(new["optim_wrapper"])
    for name in ("generator", "discriminator"):
        optim_wrapper[name]["type"] = "FusedOptimWrapper"
        optim_wrapper[name]["optimizer"]["type"] = "FusedAdam"
    hooks = tiny.default_hooks
    hooks.logger.interval = 1000
    hooks.checkpoint.interval = 1000
    return Config(dict(
        custom_imports=dict(imports=["pygan_optim"], allow_failed_imports=False),
        model=new["model"], optim_wrapper=optim_wrapper, train_cfg=new["train_cfg"],
        train_dataloader=tiny.train_dataloader, default_scope=None, default_hooks=hooks,
        env_cfg=tiny.env_cfg, log_processor=dict(by_epoch=False), log_level="WARNING",
        randomness=dict(seed=0), custom_hooks=[dict(type="ExactResumeHook")],
        work_dir=str(work_dir), resume=True, load_from=str(load_from)))


def _expected_state(old_sd):
    exp = OrderedDict()
    for k, v in old_sd.items():
        top, rest = k.split(".", 1)
        exp[("generator_ema.module." if top == "generator_ema" else top + ".") + rest] = v
    return exp


class _Resumed(Hook):
    """Checks the state right after the resume, and records the first optimizer step
    of each network (params and grads before, params after)."""

    def __init__(self, old_ckpt):
        self.old = old_ckpt
        self.before, self.after, self.checked = {}, {}, False

    def before_train(self, runner):
        assert runner.iter == self.old["meta"]["iter"]
        sd = runner.model.state_dict()
        exp = _expected_state(self.old["state_dict"])
        assert set(sd) == set(exp) | {"generator_ema.steps"}
        for k, v in exp.items():
            assert torch.equal(sd[k], v), k
        # blended in 0.x, so the EMA weights are not the generator's
        assert not torch.equal(sd["generator_ema.module.noise2feat.weight"],
                               sd["generator.noise2feat.weight"])
        assert int(sd["generator_ema.steps"]) == 2  # 2 G phases from start_iter 1 by iter 4
        for name, wrapper in runner.optim_wrapper.items():
            osd, old = wrapper.optimizer.state_dict(), self.old["optimizer"][name]
            assert isinstance(wrapper.optimizer, pygan_optim.FusedAdam)
            assert len(osd["state"]) == len(old["state"]) > 0
            for idx, s in old["state"].items():
                new = osd["state"][idx]
                assert float(new["step"]) == s["step"] == 2
                assert torch.equal(new["exp_avg"], s["exp_avg"])
                assert torch.equal(new["exp_avg_sq"], s["exp_avg_sq"])
            for key in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
                assert osd["param_groups"][0][key] == old["param_groups"][0][key]
            opt = wrapper.optimizer
            opt.register_step_pre_hook(lambda o, a, k, name=name: self._pre(name, o))
            opt.register_step_post_hook(lambda o, a, k, name=name: self._post(name, o))
        self.checked = True

    @staticmethod
    def _params(opt):
        return [p for g in opt.param_groups for p in g["params"]]

    def _pre(self, name, opt):
        if name not in self.before:
            self.before[name] = [(p.detach().clone(), p.grad.detach().clone())
                                 for p in self._params(opt)]

    def _post(self, name, opt):
        if name not in self.after:
            self.after[name] = [p.detach().clone() for p in self._params(opt)]


def _continue_0x(old_osd, before, with_state=True):
    """The 0.x optimizer continued with torch's Adam on the given params and grads."""
    params = [nn.Parameter(p.clone()) for p, _ in before]
    group = {k: v for k, v in old_osd["param_groups"][0].items() if k != "params"}
    opt = torch.optim.Adam(params, **group)
    if with_state:
        opt.load_state_dict(copy.deepcopy(old_osd))  # torch 1.x layout, as saved by 0.x
    for p, (_, g) in zip(params, before):
        p.grad = g.clone()
    opt.step()
    return [p.detach() for p in params]


# ----------------------------------------------------------------------------- resume
def test_converted_checkpoint_resumes_in_the_1x_runner(old, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    old_cfg_path, old_path, old_ckpt = old
    new_path = tmp_path / "iter_4_1x.pth"
    assert migrate_cli.main(["--checkpoint", old_path, "-o", str(new_path)]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "resumes at iter 4" in err and "checked against the 1.x model" in err
    assert "weights_only=False" in err  # the numpy score in meta.hook_msgs
    assert "warning:" not in err

    # The CLI and the library agree, and the file loads with weights_only=True.
    from_file = torch.load(str(new_path), weights_only=True)
    new, report = convert_checkpoint(old_ckpt)
    assert report.warnings == [] and report.checked_against_model
    assert report.ema_steps == 2 and report.iter == ITERS
    assert set(from_file) == {"meta", "state_dict", "optimizer", "message_hub"}
    assert list(from_file["state_dict"]) == list(new["state_dict"])
    for k, v in new["state_dict"].items():
        assert torch.equal(from_file["state_dict"][k], v), k
    assert from_file["meta"]["iter"] == ITERS and from_file["meta"]["epoch"] == 0
    assert "config" not in from_file["meta"]  # Runner.resume would parse it as 1.x
    assert from_file["meta"]["mmgen_0x"]["config"] == old_ckpt["meta"]["config"]
    assert from_file["meta"]["mmgen_0x"]["hook_msgs"]["best_score"] == 12.5
    assert from_file["meta"]["seed"] == 0
    step = from_file["optimizer"]["generator"]["state"][0]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and float(step) == 2

    cfg = _resume_cfg(old_cfg_path, tmp_path / "work", new_path)
    runner = Runner.from_cfg(cfg)
    resumed = _Resumed(old_ckpt)
    runner.register_hook(resumed, priority="VERY_HIGH")
    runner.train()
    assert resumed.checked
    assert runner.iter == 8
    assert int(runner.model.generator_ema.steps) == 4  # two more G phases, two more updates

    # The first step of each network continued the 0.x optimizer: the same result as
    # torch's Adam loaded with the 0.x state on the same grads, unlike a fresh Adam.
    assert set(resumed.before) == set(resumed.after) == {"generator", "discriminator"}
    for name in ("generator", "discriminator"):
        old_osd = old_ckpt["optimizer"][name]
        before, after = resumed.before[name], resumed.after[name]
        old_params = [old_ckpt["state_dict"][k] for k, _ in
                      getattr(runner.model, name).named_parameters(prefix=name)]
        for (p, _), q in zip(before, old_params):
            assert torch.equal(p, q)
        expected = _continue_0x(old_osd, before)
        fresh = _continue_0x(old_osd, before, with_state=False)
        for a, e in zip(after, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        # Measured: ~1.5e-8 from the 0.x-continued result, ~1 lr from a fresh Adam's.
        moved_apart = max((a - f).abs().max().item() for a, f in zip(after, fresh))
        lr = old_osd["param_groups"][0]["lr"]
        assert moved_apart > 0.5 * lr, (name, moved_apart)  # dropped moments would show


def test_ema_steps_follow_the_1x_schedule():
    model = dict(discriminator_steps=1, ema_config=dict(start_iter=1, interval=1))
    wrappers = dict(discriminator=dict(accumulative_counts=2))
    assert [ema_steps_for(n, model, wrappers) for n in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    late = dict(model, ema_config=dict(start_iter=3))  # from iteration 6 on
    assert [ema_steps_for(n, late, wrappers) for n in (4, 5, 6, 8)] == [0, 0, 1, 2]
    big = dict(discriminator_steps=1, ema_config=dict(start_iter=20000))  # BigGAN-128
    assert ema_steps_for(160000, big, dict(discriminator=dict(accumulative_counts=8))) == 1
    assert ema_steps_for(10, dict(), None) == 11  # start 0: 0.x's copy counts as a call


@pytest.mark.parametrize("start, interval, phase", [(0, 4, 2), (0, 6, 2), (0, 3, 1), (0, 2, 2),
                                                    (2, 4, 2), (6, 2, 2), (3, 6, 3)])
@pytest.mark.parametrize("done", [0, 1, 4, 7, 12])
def test_a_resumed_ema_blends_where_0x_would(start, interval, phase, done):
    """0.x's hook (mmgen/core/hooks/ema_hook.py) blends after iteration ``it`` when
    ``it >= start_iter`` and ``(it + 1 - start_iter) % interval == 0``. Resumed after
    ``done`` iterations with the converted ``steps``, our 1.x EMA called once per
    generator phase (BigGAN.train_step) must blend at those iterations."""
    from pygan_optim.gan.ema import ExponentialMovingAverage

    model = dict(discriminator_steps=phase,
                 ema_config=dict(start_iter=start // phase, interval=interval // phase))
    src = nn.Linear(1, 1, bias=False)
    ema = ExponentialMovingAverage(src, momentum=0.5, interval=interval // phase)
    ema.steps.fill_(ema_steps_for(done, model, None))
    blends_0x = [it for it in range(done, done + 30)
                 if it >= start and (it + 1 - start) % interval == 0]
    blends_1x = []
    for it in range(done, done + 30):
        if (it + 1) % phase or it + 1 < start:
            continue  # no generator phase ends here, or the EMA has not started
        with torch.no_grad():
            src.weight.fill_(2.0)
            ema.module.weight.fill_(0.0)
        ema.update_parameters(src)
        if ema.module.weight.item() == 1.0:  # blended halfway, not copied or left
            blends_1x.append(it)
    assert blends_1x == blends_0x


# ----------------------------------------------------------------------------- DDP prefixes
def _wrapped(ckpt, networks):
    """``ckpt`` as saved from DDP-wrapped modules' own ``state_dict()``: keys and the
    ``_metadata`` of the wrapped module under ``<wrapper>.module``, plus the wrapper's
    own metadata entry."""
    def fn(k):
        if not networks:
            return "module." + k if k else "module"
        top, _, rest = k.partition(".")
        return f"{top}.module" + (f".{rest}" if rest else "") if top else k

    out = copy.copy(ckpt)
    sd = ckpt["state_dict"]
    out["state_dict"] = OrderedDict((fn(k), v) for k, v in sd.items())
    meta = OrderedDict([("", {"version": 1})])
    for k, v in sd._metadata.items():
        if networks and k and "." not in k:
            meta[k] = {"version": 1}  # the DDP wrapper around the network
        meta[fn(k)] = v
    out["state_dict"]._metadata = meta
    return out


@pytest.mark.parametrize("wrap", ["model", "networks"])
def test_ddp_module_prefixes_are_removed(old, wrap):
    ckpt = old[2]
    # "networks": each network in its own DDP (0.x's DistributedDataParallelWrapper)
    wrapped = _wrapped(ckpt, networks=wrap == "networks")
    assert all(".module." in k or k.startswith("module.") for k in wrapped["state_dict"])
    plain, _ = convert_checkpoint(ckpt)
    new, report = convert_checkpoint(wrapped)
    assert any("'module.' prefix" in n for n in report.notes)
    assert list(new["state_dict"]) == list(plain["state_dict"])
    for k, v in plain["state_dict"].items():
        assert torch.equal(new["state_dict"][k], v)
    assert new["state_dict"]._metadata == plain["state_dict"]._metadata


# ----------------------------------------------------------------------------- refusals
def _bad(ckpt, **changes):
    out = copy.copy(ckpt)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def test_refuses_a_non_gan_checkpoint_from_the_cli(tmp_path, capsys):
    lin = nn.Linear(4, 2)
    opt = torch.optim.Adam(lin.parameters())
    path, out = tmp_path / "cls.pth", tmp_path / "out.pth"
    torch.save(dict(meta=dict(iter=10, epoch=1), state_dict=OrderedDict(
        ("backbone." + k, v) for k, v in lin.state_dict().items()),
        optimizer=opt.state_dict()), str(path))
    assert migrate_cli.main(["--checkpoint", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "nothing written" in err
    assert "not a BigGAN-style GAN checkpoint" in err and "backbone" in err
    assert not out.exists() and os.listdir(tmp_path) == ["cls.pth"]


def test_refuses_missing_optimizer_from_the_cli(old, tmp_path, capsys):
    path, out = tmp_path / "noopt.pth", tmp_path / "out.pth"
    torch.save(_bad(old[2], optimizer=None), str(path))
    assert migrate_cli.main(["--checkpoint", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no optimizer state" in err and "cannot be resumed" in err
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    (dict(meta=dict(epoch=1)), "meta.iter must be a non-negative integer"),
    (dict(meta=None), "no 'meta' dict"),
    (dict(state_dict=None), "no 'state_dict'"),
    (dict(message_hub={}), "already an MMEngine 1.x checkpoint"),
])
def test_refuses_incomplete_checkpoints(old, change, message):
    with pytest.raises(CheckpointConversionError, match=message):
        convert_checkpoint(_bad(old[2], **change))


def test_refuses_single_and_missing_network_optimizers(old):
    ckpt = old[2]
    with pytest.raises(CheckpointConversionError, match="single optimizer over the whole"):
        convert_checkpoint(_bad(ckpt, optimizer=ckpt["optimizer"]["generator"]))
    only_g = dict(generator=ckpt["optimizer"]["generator"])
    with pytest.raises(CheckpointConversionError, match=r"no optimizer state for \['discrim"):
        convert_checkpoint(_bad(ckpt, optimizer=only_g))
    with pytest.raises(CheckpointConversionError, match="bare model state_dict"):
        convert_checkpoint(dict(ckpt["state_dict"]))
    new, _ = convert_checkpoint(ckpt)
    with pytest.raises(CheckpointConversionError, match="already an MMEngine 1.x"):
        convert_checkpoint(new)


def test_refuses_a_parameter_count_mismatch(old):
    ckpt = old[2]
    optim = copy.deepcopy(ckpt["optimizer"])
    popped = optim["generator"]["param_groups"][0]["params"].pop()
    optim["generator"]["state"].pop(popped, None)  # (state of no parameter: refused apart)
    bad = _bad(ckpt, optimizer=optim)
    with pytest.raises(CheckpointConversionError,
                       match=r"optimizer.generator has \d+ parameters but the 1.x model's"):
        convert_checkpoint(bad)
    no_cfg = _bad(bad, meta=dict(iter=4))  # no config: checked against its own weights
    with pytest.raises(CheckpointConversionError, match="the checkpoint's generator has"):
        convert_checkpoint(no_cfg)


def test_refuses_a_config_with_another_architecture(old, tmp_path, capsys):
    cfg = migrate(old[0]).config
    cfg["model"]["generator"]["base_channels"] = 8
    cfg["model"]["discriminator"]["base_channels"] = 8
    with pytest.raises(CheckpointConversionError, match="shape mismatch"):
        convert_checkpoint(old[2], config=cfg)
    cfg_path, out = tmp_path / "other.py", tmp_path / "out.pth"
    Config(cfg).dump(str(cfg_path))
    assert migrate_cli.main(["--checkpoint", old[1], "-o", str(out),
                             "--config", str(cfg_path)]) == 1
    assert "does not fit the 1.x model" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- reported losses
def test_without_any_config_warns_and_still_converts(old):
    meta = {k: v for k, v in old[2]["meta"].items() if k != "config"}
    new, report = convert_checkpoint(_bad(old[2], meta=meta))
    assert not report.checked_against_model
    assert any("no 1.x config" in w for w in report.warnings)
    assert any("generator_ema.steps set to 1" in w for w in report.warnings)
    assert int(new["state_dict"]["generator_ema.steps"]) == 1
    with pytest.raises(CheckpointConversionError, match="strict conversion"):
        convert_checkpoint(_bad(old[2], meta=meta), strict=True)


def test_fp16_loss_scaler_goes_into_each_amp_wrapper(old):
    scaler = dict(scale=512.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                  _growth_tracker=3)
    cfg = migrate(old[0]).config
    for name in ("generator", "discriminator"):
        cfg["optim_wrapper"][name]["type"] = "AmpOptimWrapper"
    new, report = convert_checkpoint(_bad(old[2], loss_scaler=scaler), config=cfg)
    for name in ("generator", "discriminator"):
        assert new["optimizer"][name]["loss_scaler"] == scaler
    gs = torch.amp.GradScaler("cpu")
    gs.load_state_dict(new["optimizer"]["generator"]["loss_scaler"])
    assert gs.get_scale() == 512.0
    # a plain wrapper gets no scaler, and says so
    new, report = convert_checkpoint(_bad(old[2], loss_scaler=scaler))
    assert "loss_scaler" not in new["optimizer"]["generator"]
    assert any("not given to 'generator'" in w for w in report.warnings)


def test_untranslatable_entries_are_reported_and_strict_fails(old, tmp_path, capsys):
    ckpt = _bad(old[2], amp=dict(loss_scaler0=dict(loss_scale=65536.0)), extra=1)
    _, report = convert_checkpoint(ckpt)
    assert any("apex.amp" in w for w in report.warnings)
    assert any("checkpoint['extra']" in w for w in report.warnings)
    path, out = tmp_path / "amp.pth", tmp_path / "out.pth"
    torch.save(ckpt, str(path))
    assert migrate_cli.main(["--checkpoint", str(path), "-o", str(out), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "strict conversion" in err and "nothing written" in err and not out.exists()
    assert migrate_cli.main(["--checkpoint", str(path), "-o", str(out)]) == 0
    assert "warning: checkpoint['amp']" in capsys.readouterr().err and out.exists()


def test_config_without_ema_drops_the_ema_weights(old):
    cfg = migrate(old[0]).config
    del cfg["model"]["ema_config"]
    new, report = convert_checkpoint(old[2], config=cfg)
    assert not any(k.startswith("generator_ema") for k in new["state_dict"])
    assert any("generator_ema.* " in w and "dropped" in w for w in report.warnings)


def test_config_with_ema_but_no_0x_ema_starts_from_the_generator(old):
    ckpt = old[2]
    sd = OrderedDict((k, v) for k, v in ckpt["state_dict"].items()
                     if not k.startswith("generator_ema."))
    sd._metadata = OrderedDict((k, v) for k, v in ckpt["state_dict"]._metadata.items()
                               if not k.startswith("generator_ema"))
    new, report = convert_checkpoint(_bad(ckpt, state_dict=sd))  # meta.config has the EMA
    out = new["state_dict"]
    assert int(out["generator_ema.steps"]) == 0  # the first 1.x update copies
    for k, v in sd.items():
        if k.startswith("generator."):
            assert torch.equal(out["generator_ema.module." + k[len("generator."):]], v)
    assert "generator_ema.module.noise2feat" in out._metadata
    assert any("starts as a copy of the generator" in w for w in report.warnings)


# ----------------------------------------------------------------------------- CLI usage
@pytest.mark.parametrize("argv, message", [
    ([], "give a 0.x config OLD.py, or --checkpoint"),
    (["--checkpoint", "a.pth"], "--checkpoint needs -o NEW.pth"),
    (["old.py", "--checkpoint", "a.pth", "-o", "b.pth"], "not both"),
    (["old.py", "--config", "new.py"], "--config is only used with --checkpoint"),
    (["--checkpoint", "a.pth", "-o", "a.pth"], "must differ"),
])
def test_cli_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        migrate_cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_family_pygan_optim_cannot_build_is_a_warning(old):
    """A 0.x checkpoint of another family (its 1.x model lives in MMagic): nothing
    checks its keys here, which --strict refuses."""
    family = os.path.join(os.path.dirname(__file__), "migrate_data", "families", "sngan.py")
    with open(family) as f:
        ckpt = dict(old[2], meta=dict(old[2]["meta"], config=f.read()))
    _, report = convert_checkpoint(ckpt)
    assert not report.checked_against_model
    assert any("could not be built" in w and "SNGAN" in w for w in report.warnings)
    with pytest.raises(CheckpointConversionError, match="could not be built"):
        convert_checkpoint(ckpt, strict=True)


def test_cli_never_writes_over_its_inputs(tmp_path, capsys):
    """MMGeneration saves latest.pth as a link to the last iter_N.pth: -o naming
    the file behind it, or the --config, is refused before anything is read."""
    old = tmp_path / "iter_4.pth"
    old.write_bytes(b"0.x")
    (tmp_path / "latest.pth").symlink_to(old.name)
    config = tmp_path / "new.py"
    config.write_text("model = dict()")
    for argv, message in ((["--checkpoint", str(tmp_path / "latest.pth"), "-o", str(old)],
                           "must differ from OLD.pth"),
                          (["--checkpoint", str(old), "--config", str(config), "-o", str(config)],
                           "must differ from the --config")):
        with pytest.raises(SystemExit) as e:
            migrate_cli.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert old.read_bytes() == b"0.x" and config.read_text() == "model = dict()"


def test_cli_unreadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "out.pth"
    assert migrate_cli.main(["--checkpoint", str(tmp_path / "nope.pth"), "-o", str(out)]) == 1
    assert "error:" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert migrate_cli.main(["--checkpoint", str(junk), "-o", str(out)]) == 1
    assert f"cannot read {junk}" in capsys.readouterr().err
    assert not out.exists()


def test_cli_unreadable_config(old, tmp_path, capsys):
    out = tmp_path / "out.pth"
    assert migrate_cli.main(["--checkpoint", old[1], "-o", str(out),
                             "--config", str(tmp_path / "missing.py")]) == 1
    err = capsys.readouterr().err
    assert "with the config" in err and "nothing written" in err
    assert not out.exists()


def test_pygan_optim_command_and_explicit_config(old, tmp_path, capsys):
    cfg_path, out = tmp_path / "new_cfg.py", tmp_path / "sub" / "new.pth"
    Config(migrate(old[0]).config).dump(str(cfg_path))
    assert cli.main(["migrate", "--checkpoint", old[1], "-o", str(out),
                     "--config", str(cfg_path)]) == 0
    err = capsys.readouterr().err
    assert f"checked against the 1.x model of {cfg_path}" in err
    assert "state_dict.generator_ema.* -> state_dict.generator_ema.module.*" in err
    ckpt, note = load_checkpoint_file(str(out))
    assert note is None and ckpt["meta"]["iter"] == ITERS
