"""Hunt (session 40): a mutation fuzz of MMGeneration 0.x checkpoints through
``pygan-optim migrate --checkpoint`` (pygan_optim.migrate.checkpoint).

The 0.x checkpoint is built as tests/test_migrate_checkpoint.py builds one (its
0.x BigGAN config, ``_GAN0x``, torch 1.x's optimizer layout), but its Adam state
comes from two steps on random gradients instead of the 0.x training loop (same
layout, a tenth of the time). Each test mutates it: keys dropped or renamed,
dtypes and shapes changed, optimizer state keyed or laid out differently, bad
``meta``, DDP prefixes, bad files, output paths, a ``--config`` that does not fit.

Contract: either a NEW.pth that MMEngine's Runner resumes with the 0.x values
carried over exactly, or exit 1/2 with a one-line error naming the problem,
nothing written, never a traceback, never a silently wrong value.

The bugs found are fixed (session 40); a comment above each of their tests says what
happened before.
"""
import copy
import os
import pickle
import textwrap
from collections import OrderedDict

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import MODELS
from mmengine.runner import Runner

import pygan_optim
from pygan_optim import migrate_cli
from pygan_optim.migrate import migrate
from pygan_optim.migrate.checkpoint import CheckpointConversionError, convert_checkpoint
from test_migrate_checkpoint import OLD_CONFIG, _GAN0x, _resume_cfg, _torch1_layout

ITERS = 4
NETS = ("generator", "discriminator")


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """(0.x config path, 0.x checkpoint path, checkpoint dict, migrated 1.x config dict)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("mmgen0x_fuzz")
    cfg_path = root / "biggan_tiny_0x.py"
    cfg_path.write_text(textwrap.dedent(OLD_CONFIG))
    cfg = Config.fromfile(str(cfg_path))
    model = _GAN0x(cfg)
    optims = {n: torch.optim.Adam(getattr(model, n).parameters(),
                                  **{k: v for k, v in cfg.optimizer[n].items() if k != "type"})
              for n in NETS}
    for _ in range(2):
        for n, opt in optims.items():
            for p in getattr(model, n).parameters():
                p.grad = torch.randn_like(p)
            opt.step()
    with torch.no_grad():  # a blended EMA: not equal to the generator
        for p in model.generator_ema.parameters():
            p.add_(0.01)
    meta = dict(config=cfg.pretty_text, seed=0, exp_name="biggan_tiny_0x.py",
                mmgen_version="0.7.3", iter=ITERS, epoch=1, mmcv_version="1.7.2")
    ckpt = dict(meta=meta, state_dict=model.state_dict(),
                optimizer={k: _torch1_layout(o.state_dict()) for k, o in optims.items()})
    path = root / "iter_4.pth"
    torch.save(ckpt, str(path))
    return str(cfg_path), str(path), torch.load(str(path), weights_only=True), \
        migrate(str(cfg_path)).config


def _with(ckpt, **changes):
    out = copy.copy(ckpt)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _optim(ckpt, net, fn):
    """``ckpt`` with ``fn`` applied to a copy of ``optimizer[net]``."""
    optim = copy.deepcopy(ckpt["optimizer"])
    fn(optim[net])
    return _with(ckpt, optimizer=optim)


def _sd(ckpt, fn):
    """``ckpt`` with ``fn`` applied to a copy of its state_dict (``_metadata`` kept)."""
    sd = OrderedDict(ckpt["state_dict"])
    sd._metadata = copy.deepcopy(ckpt["state_dict"]._metadata)
    fn(sd)
    return _with(ckpt, state_dict=sd)


def _run_cli(argv, capsys):
    code = migrate_cli.main(argv)
    err = capsys.readouterr().err
    return code, err


def _one_line_error(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# ============================================================================ what held
class _Check(Hook):
    """Right after the resume: weights, moments, steps and the iteration equal the 0.x ones."""

    def __init__(self, old_ckpt):
        self.old, self.checked = old_ckpt, False

    def before_train(self, runner):
        assert runner.iter == ITERS
        sd = runner.model.state_dict()
        for k, v in self.old["state_dict"].items():
            top, rest = k.split(".", 1)
            new_key = ("generator_ema.module." if top == "generator_ema" else top + ".") + rest
            assert torch.equal(sd[new_key], v), k
        for name, wrapper in runner.optim_wrapper.items():
            osd, old = wrapper.optimizer.state_dict(), self.old["optimizer"][name]
            assert isinstance(wrapper.optimizer, pygan_optim.FusedAdam)
            assert set(osd["state"]) == set(old["state"])
            params = [p for g in wrapper.optimizer.param_groups for p in g["params"]]
            for idx, s in old["state"].items():
                new = osd["state"][idx]
                assert float(new["step"]) == s["step"] == 2
                assert torch.equal(new["exp_avg"], s["exp_avg"])
                assert torch.equal(new["exp_avg_sq"], s["exp_avg_sq"])
                assert new["exp_avg"].shape == params[idx].shape
        self.checked = True


def test_ddp_prefixed_torch1_checkpoint_resumes_in_the_runner_with_exact_state(
        old, tmp_path, capsys, monkeypatch):
    """Whole model saved from DDP (``module.``), the EMA inside its own wrapper too
    (``module.generator_ema.module.*``), torch 1.x optimizer layout: the CLI converts
    it, Runner resumes it and trains one iteration; before it, every weight, moment,
    step and the iteration equal the 0.x values."""
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    cfg_path, _, ckpt, _ = old

    def wrap(k):
        top, _, rest = k.partition(".")
        return "module." + (f"{top}.module.{rest}" if top == "generator_ema" else k)

    sd = OrderedDict((wrap(k), v) for k, v in ckpt["state_dict"].items())
    wrapped = _with(ckpt, state_dict=sd)
    src, out = tmp_path / "ddp.pth", tmp_path / "ddp_1x.pth"
    torch.save(wrapped, str(src))
    code, err = _run_cli(["--checkpoint", str(src), "-o", str(out)], capsys)
    assert code == 0, err
    assert "resumes at iter 4" in err and "checked against the 1.x model" in err
    cfg = _resume_cfg(cfg_path, tmp_path / "work", out)
    cfg.train_cfg["max_iters"] = ITERS + 1
    runner = Runner.from_cfg(cfg)
    check = _Check(ckpt)
    runner.register_hook(check, priority="VERY_HIGH")
    runner.train()
    assert check.checked and runner.iter == ITERS + 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_and_moments_carry_over_exactly(old, dtype):
    """fp16/bf16 weights and moments: the 1.x model and optimizer (fp32) hold exactly
    the 0.x values after loading (an upcast loses nothing)."""
    ckpt = old[2]
    low = _sd(ckpt, lambda sd: sd.update({k: v.to(dtype) for k, v in sd.items()
                                          if v.is_floating_point()}))

    def moments(o):
        for s in o["state"].values():
            s["exp_avg"], s["exp_avg_sq"] = s["exp_avg"].to(dtype), s["exp_avg_sq"].to(dtype)
    low = _optim(low, "generator", moments)
    new, _ = convert_checkpoint(low, config=old[3])
    model = MODELS.build(copy.deepcopy(old[3]["model"]))
    model.load_state_dict(new["state_dict"], strict=True)
    got = model.state_dict()
    for k, v in low["state_dict"].items():
        top, rest = k.split(".", 1)
        key = ("generator_ema.module." if top == "generator_ema" else top + ".") + rest
        assert got[key].dtype == (torch.float32 if v.is_floating_point() else v.dtype)
        assert torch.equal(got[key], v.to(got[key].dtype)), k
    opt = torch.optim.Adam(model.generator.parameters())
    opt.load_state_dict(new["optimizer"]["generator"])
    for idx, s in low["optimizer"]["generator"]["state"].items():
        assert torch.equal(opt.state_dict()["state"][idx]["exp_avg"], s["exp_avg"].float())


def test_mmcv_loss_scaler_becomes_the_grad_scaler_state(old):
    """mmcv's dynamic LossScaler: scale, factor and window kept; the count since the
    last overflow is GradScaler's growth tracker."""
    scaler = dict(cur_scale=2.0 ** 14, cur_iter=1007, mode="dynamic", last_overflow_iter=999,
                  scale_factor=2.0, scale_window=1000)
    ckpt = _with(old[2], meta=dict(old[2]["meta"], fp16=dict(loss_scaler=scaler)))
    cfg = copy.deepcopy(old[3])
    for name in NETS:
        cfg["optim_wrapper"][name]["type"] = "AmpOptimWrapper"
    new, report = convert_checkpoint(ckpt, config=cfg)
    for name in NETS:
        ls = new["optimizer"][name]["loss_scaler"]
        assert ls == dict(scale=2.0 ** 14, growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=1000, _growth_tracker=7)
    gs = torch.amp.GradScaler("cpu")
    gs.load_state_dict(new["optimizer"]["generator"]["loss_scaler"])
    assert gs.get_scale() == 2.0 ** 14


@pytest.mark.parametrize("mutation, message", [
    ("meta_no_iter", "meta.iter must be a non-negative integer"),
    ("meta_float_iter", "meta.iter must be a non-negative integer"),
    ("meta_negative_iter", "meta.iter must be a non-negative integer"),
    ("meta_bool_iter", "meta.iter must be a non-negative integer"),
    ("already_1x", "already an MMEngine 1.x checkpoint"),
    ("drop_weight", "missing in the checkpoint"),
    ("rename_weights", "missing in the checkpoint"),
    ("weight_shape", "shape mismatch"),
    ("moment_shape", "moments do not fit"),
    ("reversed_params", "moments do not fit"),
    ("extra_param_group", "2 param groups"),
    ("no_param_groups", "belong to no parameter"),
    ("drop_discriminator_optimizer", "no optimizer state for ['discriminator']"),
    ("no_state_dict", "no 'state_dict'"),
])
def test_refusals_are_one_line_and_write_nothing(old, tmp_path, capsys, mutation, message):
    ckpt = old[2]
    g = "generator.noise2feat.weight"
    if mutation.startswith("meta_"):
        iters = {"meta_float_iter": 4.0, "meta_negative_iter": -1, "meta_bool_iter": True}
        meta = {k: v for k, v in ckpt["meta"].items() if k != "iter"}
        if mutation in iters:
            meta["iter"] = iters[mutation]
        bad = _with(ckpt, meta=meta)
    elif mutation == "already_1x":
        bad = convert_checkpoint(ckpt)[0]
    elif mutation == "drop_weight":
        bad = _sd(ckpt, lambda sd: sd.pop("generator.noise2feat.bias"))
    elif mutation == "rename_weights":
        bad = _with(ckpt, state_dict=OrderedDict(
            (k.replace("noise2feat", "n2f"), v) for k, v in ckpt["state_dict"].items()))
    elif mutation == "weight_shape":
        bad = _sd(ckpt, lambda sd: sd.__setitem__(g, sd[g][:, :-1].clone()))
    elif mutation == "moment_shape":
        def fn(o):
            o["state"][0]["exp_avg"] = o["state"][0]["exp_avg"][:-1]
        bad = _optim(ckpt, "generator", fn)
    elif mutation == "reversed_params":
        bad = _optim(ckpt, "generator",
                     lambda o: o["param_groups"][0].update(
                         params=o["param_groups"][0]["params"][::-1]))
    elif mutation == "extra_param_group":
        bad = _optim(ckpt, "discriminator", lambda o: o["param_groups"].append(
            dict(o["param_groups"][0], params=[])))
    elif mutation == "no_param_groups":
        bad = _optim(ckpt, "generator", lambda o: o.update(param_groups=[]))
    elif mutation == "drop_discriminator_optimizer":
        bad = _with(ckpt, optimizer=dict(generator=ckpt["optimizer"]["generator"]))
    else:
        bad = _with(ckpt, state_dict=None)
    src, out = tmp_path / "bad.pth", tmp_path / "out.pth"
    torch.save(bad, str(src))
    code, err = _run_cli(["--checkpoint", str(src), "-o", str(out)], capsys)
    assert code == 1, err
    assert message in _one_line_error(err)
    assert "nothing written" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


def _bad_files(root, good):
    data = open(good, "rb").read()
    files = {}

    def put(name, content):
        (root / name).write_bytes(content)
        files[name] = root / name
    put("truncated_zip.pth", data[: len(data) // 2])
    put("zip_tail_cut.pth", data[:-100])
    put("text.pth", b"hello\n")
    put("empty.pth", b"")
    put("plain_pickle.pth", pickle.dumps(dict(meta=dict(iter=4))))
    legacy = root / "legacy_full.pth"
    torch.save(torch.load(good, weights_only=True), str(legacy),
               _use_new_zipfile_serialization=False)
    put("truncated_legacy.pth", legacy.read_bytes()[:60000])
    legacy.unlink()
    (root / "a_dir.pth").mkdir()
    files["a_dir.pth"] = root / "a_dir.pth"
    return files


def test_unreadable_files_are_one_line_errors(old, tmp_path, capsys):
    files = _bad_files(tmp_path, old[1])
    out = tmp_path / "out" / "new.pth"
    for name, path in files.items():
        code, err = _run_cli(["--checkpoint", str(path), "-o", str(out)], capsys)
        assert code == 1, (name, err)
        assert f"cannot read {path}" in _one_line_error(err), (name, err)
        assert not out.parent.exists(), name


def test_output_naming_the_input_is_refused_and_an_existing_output_is_replaced(
        old, tmp_path, capsys):
    src = tmp_path / "iter_4.pth"
    src.write_bytes(open(old[1], "rb").read())
    before = src.read_bytes()
    (tmp_path / "latest.pth").symlink_to(src.name)
    os.link(src, tmp_path / "hard.pth")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up.pth").symlink_to(os.path.join("..", src.name))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for o in ("iter_4.pth", "./iter_4.pth", "latest.pth", "hard.pth", "sub/up.pth",
                  str(src), "sub/../iter_4.pth"):
            with pytest.raises(SystemExit) as e:
                migrate_cli.main(["--checkpoint", "latest.pth", "-o", o])
            assert e.value.code == 2, o
            assert "NEW.pth must differ from OLD.pth" in capsys.readouterr().err, o
    finally:
        os.chdir(cwd)
    assert src.read_bytes() == before
    existing = tmp_path / "new.pth"
    existing.write_bytes(b"an older conversion")
    code, err = _run_cli(["--checkpoint", str(src), "-o", str(existing)], capsys)
    assert code == 0, err
    assert torch.load(str(existing), weights_only=True)["meta"]["iter"] == ITERS
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_missing_state_for_an_unstepped_parameter_is_fine(old):
    """A parameter that never had a gradient has no Adam state (torch leaves it out)."""
    new, report = convert_checkpoint(
        _optim(old[2], "generator", lambda o: o["state"].pop(3)), config=old[3])
    assert 3 not in new["optimizer"]["generator"]["state"]
    assert torch.equal(new["optimizer"]["generator"]["state"][4]["exp_avg"],
                       old[2]["optimizer"]["generator"]["state"][4]["exp_avg"])


# ============================================================================ bugs found
def _refused(ckpt, config=None):
    """The conversion refuses with CheckpointConversionError (not passes, not crashes)."""
    with pytest.raises(CheckpointConversionError):
        convert_checkpoint(ckpt, config=config)


def _restate(o, fn):
    o["state"] = dict(fn(o["state"]))


# Fixed in session 40, was: Bug: Adam state keyed by other ids than the param_groups'
# 'params' is converted without a word; torch's load_state_dict maps state by those ids,
# so every moment becomes an orphan entry and the resumed Adam starts fresh (verified with
# Runner: resumed, state keys '0','1',... attached to no parameter). check.py reads
# osd['state'].get(idx) per param id and skips a missing one, but never checks that the
# state keys are among the ids. Should refuse (or re-key when unambiguous).
@pytest.mark.parametrize("rekey", ["str_keys", "shifted_by_100", "extra_orphan_entry"])
def test_state_keyed_differently_from_the_params_is_refused(old, rekey):
    def fn(o):
        if rekey == "str_keys":  # e.g. the state_dict went through JSON
            _restate(o, lambda s: ((str(k), v) for k, v in s.items()))
        elif rekey == "shifted_by_100":
            _restate(o, lambda s: ((k + 100, v) for k, v in s.items()))
        else:  # one moment more than there are parameters
            o["state"][999] = copy.deepcopy(o["state"][0])
    _refused(_optim(old[2], "generator", fn))


# Fixed in session 40, was: Bug: an Adam state entry that torch cannot resume from is
# converted; the Runner then crashes in the first step with a traceback (KeyError: 'step'
# / KeyError: 'exp_avg_sq' / TypeError: object of type 'NoneType' has no len()), with
# FusedAdam and torch.optim.Adam alike. optimizer_state.convert_optimizer_state only
# converts entries that have exp_avg, exp_avg_sq and step, and passes others through;
# check.py skips non-dict entries. Should refuse, naming the entry.
@pytest.mark.parametrize("broken", ["no_step", "no_exp_avg_sq", "entry_none"])
def test_adam_state_entries_torch_cannot_resume_are_refused(old, broken):
    def fn(o):
        for idx, s in o["state"].items():
            if broken == "no_step":
                s.pop("step")
            elif broken == "no_exp_avg_sq":
                s.pop("exp_avg_sq")
        if broken == "entry_none":
            o["state"][0] = None
    _refused(_optim(old[2], "discriminator", fn))


# Fixed in session 40, was: Bug: a param group without 'lr' (or
# 'betas'/'eps'/'weight_decay') is converted; torch's load_state_dict takes the saved
# group as is and the Runner crashes in the first step (KeyError: 'lr').
# optimizer_state.py only notes the keys newer torch versions add (maximize, foreach,
# ...), which the optimizer fills in. Should refuse (or fill the value from the 1.x
# config, with a warning).
@pytest.mark.parametrize("key", ["lr", "betas"])
def test_param_group_without_a_required_key_is_refused(old, key):
    _refused(_optim(old[2], "generator", lambda o: o["param_groups"][0].pop(key)))


# Fixed in session 40, was: Bug: --config whose generator optimizer is SGD, for a
# checkpoint holding Adam state (exp_avg/exp_avg_sq, betas): converted with no warning;
# the Runner's SGD takes the saved Adam group and crashes in its first step (KeyError:
# 'momentum'); had it run, the Adam moments would be ignored. Nothing in
# convert.py/check.py compares the wrapper's optimizer type with the state. Should refuse,
# naming both optimizers.
def test_config_with_another_optimizer_type_is_refused(old):
    cfg = copy.deepcopy(old[3])
    cfg["optim_wrapper"]["generator"]["optimizer"] = dict(type="SGD", lr=0.01, momentum=0.9)
    _refused(old[2], config=cfg)


# Fixed in session 40, was: Bug: --config with a paramwise_cfg (custom_keys or
# bias_decay_mult: MMEngine's constructor then makes one param group per parameter) is
# converted although the checkpoint has one group; the Runner crashes on resume
# (ValueError: loaded state dict has a different number of parameter groups). check.py
# skips the group-count check whenever paramwise_cfg is set. Should build the 1.x groups
# (or count them) and refuse a mismatch (or regroup the state).
@pytest.mark.parametrize("paramwise", [dict(custom_keys={"noise2feat": dict(lr_mult=0.1)}),
                                       dict(bias_decay_mult=0.0)])
def test_config_with_paramwise_groups_is_checked(old, paramwise):
    cfg = copy.deepcopy(old[3])
    cfg["optim_wrapper"]["generator"]["paramwise_cfg"] = paramwise
    cfg["optim_wrapper"]["generator"]["optimizer"]["weight_decay"] = 0.0
    _refused(old[2], config=cfg)


# Fixed in session 40, was: Bug: tensors whose dtype differs from the 1.x model's are
# converted silently; load_state_dict / the optimizer's load then cast them: fp64 weights
# or moments lose their low bits, a float num_batches_tracked of 2.5 becomes 2, an int64
# weight becomes float. check.py compares keys and shapes only. Should refuse a lossy cast
# (or at least warn, naming the dtype, so --strict refuses).
@pytest.mark.parametrize("mutation", ["fp64_weights", "float_num_batches_tracked",
                                      "int_weight", "fp64_moments"])
def test_lossy_dtype_changes_are_not_silent(old, mutation):
    ckpt = old[2]
    g = "generator.noise2feat.weight"
    if mutation == "fp64_weights":  # values fp32 cannot hold
        bad = _sd(ckpt, lambda sd: sd.update({k: v.double() + 1e-12 for k, v in sd.items()
                                              if v.is_floating_point()}))
    elif mutation == "float_num_batches_tracked":
        k = "generator.conv_blocks.0.bn1.bn.num_batches_tracked"
        bad = _sd(ckpt, lambda sd: sd.__setitem__(k, torch.tensor(2.5)))
    elif mutation == "int_weight":
        bad = _sd(ckpt, lambda sd: sd.__setitem__(g, (sd[g] * 1000).long()))
    else:
        def fn(o):
            for s in o["state"].values():
                s["exp_avg"] = s["exp_avg"].double() + 1e-12
        bad = _optim(ckpt, "generator", fn)
    try:
        _, report = convert_checkpoint(bad, config=old[3])
    except CheckpointConversionError:
        return
    assert any("dtype" in w or "float64" in w or "int64" in w for w in report.warnings), \
        report.warnings


# Fixed in session 40, was: Bug: a malformed optimizer state makes convert_checkpoint
# raise a raw RuntimeError/AttributeError/KeyError instead of CheckpointConversionError;
# the CLI then prints e.g. "cannot convert X: KeyError: 'params'", which names neither the
# network nor the entry. optimizer_state.is_optimizer_state only checks that 'state' and
# 'param_groups' exist; group_params/convert_optimizer_state index them blindly. Should
# validate the layout (state a dict of dicts, groups dicts with a 'params' list, 'step' a
# number or one-element tensor) and fail naming optimizer.<net>.
@pytest.mark.parametrize("malformed", ["vector_step", "state_is_a_list", "group_without_params"])
def test_malformed_optimizer_state_is_a_conversion_error(old, malformed):
    def fn(o):
        if malformed == "vector_step":
            o["state"][0]["step"] = torch.tensor([2, 3])
        elif malformed == "state_is_a_list":
            o["state"] = list(o["state"].values())
        else:
            o["param_groups"][0].pop("params")
    with pytest.raises(CheckpointConversionError, match="optimizer.generator"):
        convert_checkpoint(_optim(old[2], "generator", fn))
