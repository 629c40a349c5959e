"""The iteration part: one period of the seed schedule through MMEngine-built wrappers,
fused against native, with the optimizer steps' share of the time."""
from __future__ import annotations

import time
from typing import Dict, List

import torch

import harness
from biggan_models import SEED_HP, model_cfgs
from biggan_results import Results, summary

import pygan_optim


def part_iteration(res: Results, args, timer) -> Dict[str, dict]:
    """One period of the seed schedule, both configs, from MMEngine-built wrappers."""
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.optim import build_optim_wrapper

    from pygan_optim.console import QuietConsoleFilter, console_handlers

    # MMEngine's note on BatchNorm with gradient accumulation, once per G phase, says
    # nothing here: the seed schedule accumulates on purpose.
    for handler in console_handlers(MMLogger.get_current_instance()):
        handler.addFilter(QuietConsoleFilter(dumps=()))
    cfgs = model_cfgs(args.quick)
    accu = 8
    out = {}
    samples: Dict[str, List[float]] = {}
    share: Dict[str, List[float]] = {}
    rigs = {}
    for name, (wrapper_type, opt_type) in {"pygan_optim (fused)": ("FusedOptimWrapper", "FusedAdam"),
                                            "native (seed config)": ("OptimWrapper", "Adam")}.items():
        torch.manual_seed(0)
        model = pygan_optim.gan.BigGAN(
            generator=dict(type="BigGANGenerator", **cfgs["generator"]),
            discriminator=dict(type="BigGANDiscriminator", **cfgs["discriminator"]),
            num_classes=1000, ema_config=dict(momentum=1e-4, interval=1, update_buffers=True)
        ).to(args.device)
        optim_cfg = dict(constructor="MultiOptimWrapperConstructor", **{
            key: dict(type=wrapper_type, accumulative_counts=accu,
                      optimizer=dict(type=opt_type, **SEED_HP[key])) for key in SEED_HP})
        wrappers = build_optim_wrapper(model, optim_cfg)
        spent = [0.0]
        for w in wrappers.values():  # time spent in optimizer steps
            step = w.step

            def timed(*a, step=step, spent=spent, **kw):
                t0 = time.perf_counter()
                step(*a, **kw)
                spent[0] += time.perf_counter() - t0
            w.step = timed
        g = torch.Generator().manual_seed(0)
        size = cfgs["generator"]["output_scale"]
        batch = dict(inputs=dict(img=[torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
                                      for _ in range(args.batch)]),
                     data_samples=dict(gt_label=list(range(args.batch))))
        rigs[name] = (model, wrappers, batch, spent)
        samples[name], share[name] = [], []

    show = harness.progress_printer("iteration")
    where = [""]

    def period(name):
        model, wrappers, batch, spent = rigs[name]
        spent[0] = 0.0
        t0 = time.perf_counter()
        for k in range(accu):  # discriminator_steps (1) x accumulative_counts data reads
            show(f"{where[0]}, {name}: forward/backward {k + 1}/{accu}")
            model.train_step(batch, wrappers)
        total = time.perf_counter() - t0
        samples[name].append(total)
        share[name].append(spent[0] / total)

    MessageHub.get_instance("pygan_optim_bench")
    repeats = max(1, args.iteration_repeats)
    period_fns = {n: (lambda n=n: period(n)) for n in rigs}
    where[0] = "warm-up"
    for n in rigs:  # warm-up: allocates optimizer state
        period_fns[n]()
        samples[n].clear()
        share[n].clear()
    for r in range(repeats):
        where[0] = f"period {r + 1}/{repeats}"
        for n in (list(rigs) if r % 2 == 0 else list(rigs)[::-1]):
            period_fns[n]()
    res.add("iteration (8 reads)", samples, "pygan_optim (fused)", {}, ["native (seed config)"])
    show.done(summary(res, "iteration (8 reads)"))
    for n in rigs:
        res.data["iteration (8 reads)"][n]["optimizer_share"] = harness.median(share[n])
        out[n] = dict(optimizer_share=harness.median(share[n]))
    return out
