"""`pygan-optim train` end to end, against MMEngine's own ``Runner.from_cfg`` on the
same config (session 32 hunt).

The training runs are subprocesses on the tiny BigGAN config, a few iterations each.
Four bugs have a test each (marked "Bug"); the other tests cover what was checked
and held: the command's checkpoints equal the Runner's bit for bit, a run interrupted
with Ctrl-C (exit 130) and resumed with --resume equals an uninterrupted one, --resume
with no checkpoint trains from scratch, and the config dumped into the work dir
reproduces the run.
"""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pygan_optim import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "biggan_32x32_tiny.py")
CMD = [sys.executable, "-m", "pygan_optim.cli", "train"]
# 6 iterations, a checkpoint every 3: iteration 3 ends in the middle of the
# discriminator's accumulation window (accumulative_counts=2).
SIX = ["train_cfg.max_iters=6", "default_hooks.checkpoint.interval=3",
       "default_hooks.logger.interval=1"]


def _env(extra_path=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the CLI sets it itself
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return env


def train(config, work, *options, resume=False, extra_path=None, timeout=240):
    argv = [config, "--work-dir", str(work)] + (["--resume"] if resume else [])
    argv += ["--cfg-options", *options] if options else []
    p = subprocess.run(CMD + argv, capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=_env(extra_path))
    return p.returncode, p.stdout, p.stderr


_RUNNER = textwrap.dedent("""
    import argparse, os, sys
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner
    cfg = Config.fromfile(sys.argv[1])
    ns = argparse.Namespace(options={})
    DictAction(option_strings=[], dest="options")(None, ns, sys.argv[3:])
    cfg.merge_from_dict(ns.options)
    cfg.work_dir = sys.argv[2]
    Runner.from_cfg(cfg).train()
""")


def runner_from_cfg(config, work, *options):
    """The oracle: MMEngine's Runner.from_cfg on the same config and options."""
    p = subprocess.run([sys.executable, "-c", _RUNNER, config, str(work), *options],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]


def _flat(x, prefix=""):
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flat(val, f"{prefix}/{key}").items()}
    if isinstance(x, (list, tuple)):
        return {k: v for i, val in enumerate(x) for k, v in _flat(val, f"{prefix}[{i}]").items()}
    if type(x).__name__ == "HistoryBuffer":  # MMEngine's logged values
        return _flat(dict(vars(x)), prefix)
    return {prefix: x}


# What differs between two runs of the same training: the clock, the run's name,
# the work dir inside the config text.
_RUN_SPECIFIC = ("/meta/time", "/meta/cfg", "/meta/experiment_name", "/meta/mmengine",
                 "/meta/env", "/meta/hook_msgs", "/message_hub/runtime_info/cfg",
                 "/message_hub/runtime_info/experiment_name",
                 "/message_hub/runtime_info/last_ckpt", "/message_hub/log_scalars/train/time",
                 "/message_hub/log_scalars/train/data_time",
                 "/message_hub/runtime_info/time", "/message_hub/runtime_info/eta")


def assert_same_checkpoint(a_path, b_path):
    a = _flat(torch.load(a_path, map_location="cpu", weights_only=False))
    b = _flat(torch.load(b_path, map_location="cpu", weights_only=False))
    keys = {k for k in set(a) | set(b) if not k.startswith(_RUN_SPECIFIC)}
    assert {k for k in keys if k not in a or k not in b} == set()
    assert any(k.startswith("/state_dict/generator_ema") for k in keys)
    assert any(k.startswith("/optimizer/discriminator/state") for k in keys)
    differ = []
    for k in sorted(keys):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            same = isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        elif isinstance(x, np.ndarray):
            same = isinstance(y, np.ndarray) and np.array_equal(x, y)
        else:
            same = x == y
        if not same:
            differ.append(k)
    assert differ == []


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """`pygan-optim train` for 6 iterations, uninterrupted."""
    work = tmp_path_factory.mktemp("straight")
    code, out, err = train(TINY, work, *SIX)
    assert code == 0, err[-3000:]
    return work, out


# --- what held -------------------------------------------------------------------

def test_cli_checkpoints_equal_the_runners_bit_for_bit(straight, tmp_path):
    work, out = straight
    assert "Iter(train) [6/6]" in out
    assert (work / "last_checkpoint").read_text().strip() == str(work / "iter_6.pth")
    assert (work / "biggan_32x32_tiny.py").is_file()
    runner_from_cfg(TINY, tmp_path, *SIX)
    for it in (3, 6):
        assert_same_checkpoint(work / f"iter_{it}.pth", tmp_path / f"iter_{it}.pth")


def test_interrupted_run_resumes_to_the_uninterrupted_bits(straight, tmp_path):
    """Ctrl-C after the checkpoint of iteration 3 (mid accumulation window): exit
    130 with the checkpoint named; --resume then finishes bit for bit as the run
    that was never interrupted, and its log shows the same losses."""
    p = subprocess.Popen(CMD + [TINY, "--work-dir", str(tmp_path), "--cfg-options",
                                "train_cfg.max_iters=1000", *SIX[1:]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=_env())
    try:
        for line in p.stdout:
            # the checkpoint of iteration 3 is complete once iteration 4 is logged
            if "Iter(train) [   4/1000]" in line:
                p.send_signal(signal.SIGINT)
                break
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert (f"the last checkpoint is {tmp_path / 'iter_3.pth'} (continue with --resume)"
            in err)
    code, out, err = train(TINY, tmp_path, *SIX, resume=True)
    assert code == 0, err[-3000:]
    assert "resumed epoch: 0, iter: 3" in out
    assert_same_checkpoint(straight[0] / "iter_6.pth", tmp_path / "iter_6.pth")

    def losses(text, it):
        line = next(line for line in text.splitlines() if f"Iter(train) [{it}/6]" in line)
        return line[line.index("loss:"):]

    for it in (4, 5, 6):
        assert losses(out, it) == losses(straight[1], it)


def test_resume_without_a_checkpoint_trains_from_scratch(straight, tmp_path):
    code, out, err = train(TINY, tmp_path, *SIX, resume=True)
    assert code == 0, err[-3000:]
    assert_same_checkpoint(straight[0] / "iter_6.pth", tmp_path / "iter_6.pth")


def test_the_dumped_config_reproduces_the_run(straight, tmp_path):
    dumped = straight[0] / "biggan_32x32_tiny.py"
    assert "max_iters=6" in dumped.read_text()
    code, out, err = train(str(dumped), tmp_path)
    assert code == 0, err[-3000:]
    assert_same_checkpoint(straight[0] / "iter_6.pth", tmp_path / "iter_6.pth")


# --- bugs ------------------------------------------------------------------------

@pytest.mark.parametrize("registry, typo, says", [
    ("DATA_SAMPLERS", "InfiniteSamplr", "unknown data sampler type 'InfiniteSamplr'; "
                                        "did you mean 'InfiniteSampler'?"),
    ("OPTIM_WRAPPER_CONSTRUCTORS", "MultiOptimWrapperConstructr",
     "unknown optimizer wrapper constructor type 'MultiOptimWrapperConstructr'; "
     "did you mean 'MultiOptimWrapperConstructor'?"),
    ("PARAM_SCHEDULERS", "LinearLRR", "unknown parameter scheduler type 'LinearLRR'; "
                                      "did you mean 'LinearLR'?"),
])
def test_bug_unknown_type_in_a_registry_whose_name_has_spaces(registry, typo, says):
    """Bug: MMEngine's 'data sampler', 'optimizer wrapper constructor' and
    'parameter scheduler' registries have spaces in their names, which the
    pattern for "X is not in the scope::name registry." did not take: a typo'd
    sampler, constructor or scheduler type printed MMEngine's whole paragraph
    with a URL, and no 'did you mean'."""
    import mmengine.registry as registries

    import pygan_optim  # noqa: F401  (registers MultiOptimWrapperConstructor)

    with pytest.raises(KeyError) as e:
        getattr(registries, registry).build(dict(type=typo))
    assert cli._one_line(e.value) == says


def test_bug_ctrl_c_while_the_dataset_is_built_does_not_build_it_again(tmp_path):
    """Bug: on Ctrl-C the CLI read `runner.iter` for its message. That property
    builds the train loop (dataset, dataloader) when it is still a config, so a
    Ctrl-C while the Runner built the dataset (a large image folder being scanned)
    built it all over again before the message came; a second Ctrl-C then gave a
    traceback. The stand-in dataset counts its builds and takes the Ctrl-C in its
    first one."""
    (tmp_path / "ctrl_c_dataset.py").write_text(textwrap.dedent("""
        from mmengine.registry import DATASETS
        from pygan_optim.datasets import SyntheticImageDataset

        @DATASETS.register_module()
        class CtrlCDataset(SyntheticImageDataset):
            def __init__(self, log, **kwargs):
                with open(log, "a") as f:
                    f.write("built\\n")
                if open(log).read().count("built") == 1:
                    raise KeyboardInterrupt  # as Ctrl-C in the middle of a scan
                super().__init__(**kwargs)
    """))
    log = tmp_path / "builds.log"
    config = tmp_path / "cfg.py"
    config.write_text(f"_base_ = [{TINY!r}]\n"
                      "custom_imports = dict(imports=['pygan_optim', 'ctrl_c_dataset'])\n"
                      "train_dataloader = dict(dataset=dict(type='CtrlCDataset', "
                      f"log={str(log)!r}))\n")
    code, out, err = train(str(config), tmp_path / "w", "train_cfg.max_iters=2",
                           extra_path=tmp_path)
    assert code == 130, err[-3000:]
    assert err.splitlines()[-1] == "pygan-optim train: interrupted; no checkpoint was saved"
    assert log.read_text() == "built\n"


def test_bug_a_dataloader_workers_error_is_one_line_without_its_traceback(tmp_path):
    """Bug: every config but the tiny one loads data in worker processes, where
    torch re-raises a dataset's error with the worker's traceback inside the
    message; the CLI's "one line" was that whole traceback squashed (frames,
    carets and all). Now: the original error, and where it came from."""
    from torch.utils.data import DataLoader

    from pygan_optim.datasets import ImageFolderDataset

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    loader = DataLoader(ImageFolderDataset(str(tmp_path), img_size=8), num_workers=1)
    with pytest.raises(ValueError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)
    assert cli._one_line(e.value) == (
        f"ValueError: ImageFolderDataset: cannot decode {tmp_path / 'a' / 'broken.png'} "
        "(empty, truncated or not an image); remove it from the dataset root "
        "(in DataLoader worker process 0)")


def test_bug_turning_amp_on_with_cfg_options_is_no_typo(tmp_path):
    """Bug: `--cfg-options optim_wrapper.generator.type=FusedAmpOptimWrapper
    optim_wrapper.generator.dtype=bfloat16` (the README's way to AMP) warned
    "adds a new key; did you mean optim_wrapper.generator.type?": 'dtype' is
    close to its sibling 'type'. A key that the dict's class takes as an
    argument is no typo; on a wrapper that does not take it, the warning stays."""
    from mmengine.config import Config

    import pygan_optim  # noqa: F401

    cfg = Config.fromfile(TINY)
    amp = {f"optim_wrapper.{n}.type": "FusedAmpOptimWrapper"
           for n in ("generator", "discriminator")}
    assert cli._check_keys(cfg, dict(amp, **{
        "optim_wrapper.generator.dtype": "bfloat16",
        "optim_wrapper.discriminator.dtype": "float16",
        "optim_wrapper.discriminator.loss_scale": "dynamic"})) == []
    assert cli._check_keys(cfg, {"optim_wrapper.generator.dtype": "bfloat16"}) == [
        "--cfg-options optim_wrapper.generator.dtype adds a new key; did you mean "
        "optim_wrapper.generator.type?"]
    # and end to end: an AMP run's stderr is empty
    code, out, err = train(TINY, tmp_path, "train_cfg.max_iters=2", *[
        f"{k}={v}" for k, v in amp.items()], "optim_wrapper.generator.dtype=bfloat16",
        "optim_wrapper.discriminator.dtype=bfloat16")
    assert code == 0, err[-3000:]
    assert err == ""
