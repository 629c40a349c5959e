"""Known gaps closed in session 32 (NOTES "Known gaps"); each test failed before its fix."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pygan_optim import ops
from pygan_optim.migrate import migrate

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

_GAN = """
model = dict(
    type='BasiccGAN',
    generator=dict(type='BigGANGenerator', output_scale=32, num_classes=10),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict()
optimizer = dict(generator=dict(type='Adam', lr=0.0002),
                 discriminator=dict(type='Adam', lr=0.0002))
total_iters = 1000
"""


@pytest.mark.parametrize("lr_config, missing", [
    ("dict(policy='step', by_epoch=False, gamma=0.5)", "'step'"),
    ("dict(policy='Exp', by_epoch=False)", "'gamma'"),
])
def test_lr_policy_without_its_required_argument_is_kept_with_a_warning(
        tmp_path, lr_config, missing):
    # Was a bare KeyError from deep inside the converter.
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(_GAN) + f"lr_config = {lr_config}\n")
    r = migrate(str(path))
    assert "param_scheduler" not in r.config or r.config["param_scheduler"] is None
    assert any(missing in w and "not converted" in w for w in r.warnings), r.warnings
    assert any(i.path == "lr_config" for i in r.untranslated)


def test_an_ema_overlap_is_named_by_its_parameter_index():
    # emas=[None, x]: the message said "emas[0]" (the position among the given EMAs).
    params = [torch.zeros(4), torch.zeros(4)]
    grads = [torch.ones(4), torch.ones(4)]
    exp_avgs, exp_avg_sqs = [torch.zeros(4), torch.zeros(4)], [torch.zeros(4), torch.zeros(4)]
    steps = [torch.zeros(()), torch.zeros(())]
    with pytest.raises(RuntimeError, match=r"emas\[1\] and exp_avgs\[1\] share memory"):
        ops.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=0.1, beta1=0.9,
                       beta2=0.999, eps=1e-8, emas=[None, exp_avgs[1]], ema_momentum=0.9)
    assert torch.equal(params[0], torch.zeros(4))  # refused before anything was written


@pytest.mark.slow
def test_bench_zero_grad_says_where_its_json_went(tmp_path):
    out_json = tmp_path / "zg.json"
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_zero_grad.py"), "--quick",
                          "--repeats", "1", "--json", str(out_json)],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    assert out_json.exists() and f"raw samples: {out_json}" in out


@pytest.mark.parametrize("value, expected", [("1e3", 1000), ("2000.0", 2000)])
def test_an_integral_float_total_iters_is_written_as_an_integer(tmp_path, value, expected):
    # Was refused ("total_iters must be a positive integer"); mmcv's runner ran it.
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(_GAN).replace("total_iters = 1000",
                                                  f"total_iters = {value}"))
    r = migrate(str(path))
    assert r.config["train_cfg"]["max_iters"] == expected
    assert type(r.config["train_cfg"]["max_iters"]) is int


@pytest.mark.parametrize("value", ["1500.5", "0.0", "-1e3", "float('inf')"])
def test_other_float_total_iters_are_still_refused(tmp_path, value):
    from pygan_optim.migrate import MigrationError
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(_GAN).replace("total_iters = 1000",
                                                  f"total_iters = {value}"))
    with pytest.raises(MigrationError, match="total_iters must be a positive integer"):
        migrate(str(path))
