"""BigGAN: a conditional GAN trained with MMagic 1.x's D/G update schedule and hinge loss."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MessageHub
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import MODELS

from ..optim import FusedAdam
from .ema import ExponentialMovingAverage


class BigGAN(BaseModel):
    """The GAN model of the BigGAN configs, on plain MMEngine.

    ``train_step`` follows MMagic 1.x's ``BaseGAN`` schedule. Each call is one
    data read: the discriminator does one backward through its wrapper's
    ``update_params`` (so it steps every ``accumulative_counts`` calls). When
    ``(iter + 1) % (discriminator_steps * D accumulative_counts) == 0`` the
    generator runs ``generator_steps * G accumulative_counts`` backward passes,
    its wrapper's count status initialised for that window, with the
    discriminator's ``requires_grad`` off meanwhile; then the EMA generator (if
    any) is updated. ``iter`` is the Runner's (MessageHub ``iter``), or the
    number of ``train_step`` calls when there is no Runner.

    Losses: hinge, ``relu(1 - D(real)) + relu(1 + D(fake))`` for D and
    ``-D(G(z))`` for G. ``ema_config``: ``ExponentialMovingAverage`` arguments
    plus ``start_iter`` (in generator-update units, as in MMagic). With a
    ``FusedAdam`` generator optimizer the EMA is blended inside the generator's
    last update of the window (``ema_config`` ``blend_in_step=False`` turns that
    off; the results are the same bits either way).
    """

    # train_step hands the EmaBlend to the generator's last update itself (a
    # subclass with False follows MMagic's flow exactly: BlendEmaInStepHook).
    blends_ema_in_step = True

    def __init__(self, generator: dict, discriminator: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None, generator_steps: int = 1,
                 discriminator_steps: int = 1, noise_size: Optional[int] = None,
                 num_classes: Optional[int] = None, ema_config: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor or dict(type="DataPreprocessor"),
                         init_cfg=init_cfg)
        # As MMagic: the model's noise_size/num_classes fill in what the sub-configs omit.
        d_defaults = {} if num_classes is None else dict(num_classes=num_classes)
        g_defaults = dict(d_defaults, **({} if noise_size is None else dict(noise_size=noise_size)))
        self.generator = _build(generator, g_defaults)
        self.discriminator = _build(discriminator, d_defaults) if discriminator else None
        self.noise_size = noise_size or getattr(self.generator, "noise_size", 120)
        self.num_classes = num_classes if num_classes is not None else getattr(
            self.generator, "num_classes", 0)
        if generator_steps < 1 or discriminator_steps < 1:
            raise ValueError(f"generator_steps ({generator_steps}) and discriminator_steps "
                             f"({discriminator_steps}) must be at least 1")
        self.generator_steps = generator_steps
        self.discriminator_steps = discriminator_steps
        self.ema_start = 0
        self.generator_ema = None
        if ema_config is not None:
            ema_config = dict(ema_config)
            ema_type = ema_config.pop("type", "ExponentialMovingAverage")
            if ema_type not in ("ExponentialMovingAverage", "FusedExponentialMovingAverage"):
                raise ValueError(f"ema_config type {ema_type!r} is not supported (only "
                                 "'ExponentialMovingAverage' or 'FusedExponentialMovingAverage', "
                                 "both pygan_optim's fused EMA)")
            self.ema_start = ema_config.pop("start_iter", 0)
            self.generator_ema = ExponentialMovingAverage(self.generator, **ema_config)
        self._calls = 0

    @property
    def with_ema_gen(self) -> bool:
        return self.generator_ema is not None

    # ---- sampling -------------------------------------------------------------
    # As MMagic 1.x draws them: on the CPU (a seed gives the same batches on
    # every device), the noise before the labels.
    def sample_noise(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.noise_size).to(self.data_preprocessor.device)

    def sample_labels(self, batch: int) -> Optional[torch.Tensor]:
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (batch,)).to(self.data_preprocessor.device)

    def sample_inputs(self, batch: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(noise, labels) for a fake batch, drawn in MMagic's order."""
        noise = self.sample_noise(batch)
        return noise, self.sample_labels(batch)

    def forward(self, inputs=None, data_samples=None, mode: str = "tensor"):
        """Samples images: ``len(gt_label)`` of them (with those classes) or
        ``inputs['num_batches']``; from the EMA generator when there is one."""
        labels = (data_samples or {}).get("gt_label")
        batch = len(labels) if labels is not None else int((inputs or {}).get("num_batches", 1))
        noise = self.sample_noise(batch)  # before any labels are drawn, as in MMagic
        if labels is None:
            labels = self.sample_labels(batch)
        generator = self.generator_ema if self.with_ema_gen else self.generator
        with torch.no_grad():
            return generator(noise, label=labels)

    def _check_labels(self, data: dict) -> None:
        """Refuses class labels outside [0, num_classes) while they are still on
        the host (as collated), by name: past that, the embeddings fail with a
        bare IndexError (on a GPU, a device-side assert that ends the process).
        Labels already on a device are left to the model (reading them would
        wait for it)."""
        samples = data.get("data_samples") if isinstance(data, dict) else None
        labels = samples.get("gt_label") if isinstance(samples, dict) else None
        if not self.num_classes or labels is None:
            return
        if isinstance(labels, torch.Tensor):
            if labels.device.type != "cpu" or labels.numel() == 0:
                return
            low, high = int(labels.min()), int(labels.max())
        else:
            values = [int(v) for v in labels]
            if not values:
                return
            low, high = min(values), max(values)
        bad = high if high >= self.num_classes else low if low < 0 else None
        if bad is not None:
            raise ValueError(f"BigGAN: a class label {bad} in the batch, outside the model's "
                             f"num_classes={self.num_classes} (labels 0..{self.num_classes - 1});"
                             " does the dataset have more classes (folders) than the model? "
                             "Set the model's num_classes to the dataset's")

    def val_step(self, data: dict) -> List[Dict[str, torch.Tensor]]:
        self._check_labels(data)
        data = self.data_preprocessor(data, False)
        images = self(**data, mode="predict")
        return [dict(fake_img=img) for img in images]

    test_step = val_step

    # ---- training -------------------------------------------------------------
    def train_step(self, data: dict, optim_wrapper: OptimWrapperDict) -> Dict[str, torch.Tensor]:
        curr_iter = MessageHub.get_current_instance().get_info("iter")
        if curr_iter is None:
            curr_iter = self._calls
        self._check_labels(data)  # (a refused batch is not counted)
        self._calls += 1
        data = self.data_preprocessor(data, True)
        d_wrapper: OptimWrapper = optim_wrapper["discriminator"]
        d_accu = d_wrapper._accumulative_counts
        with d_wrapper.optim_context(self.discriminator):
            log_vars = self.train_discriminator(**data, optimizer_wrapper=d_wrapper)

        if (curr_iter + 1) % (self.discriminator_steps * d_accu) == 0:
            self.discriminator.requires_grad_(False)
            g_wrapper: OptimWrapper = optim_wrapper["generator"]
            passes = self.generator_steps * g_wrapper._accumulative_counts
            g_wrapper.initialize_count_status(self.generator, 0, passes)
            generator = self.generator.module if is_model_wrapper(self.generator) else self.generator
            ema_updates = (self.with_ema_gen and
                           curr_iter + 1 >= self.ema_start * self.discriminator_steps * d_accu)
            # The last pass steps the optimizer: it may blend the EMA as it updates.
            blend = (self.generator_ema.blend_in_step(generator)
                     if ema_updates and self.blends_ema_in_step
                     and isinstance(g_wrapper.optimizer, FusedAdam) else None)
            gen_logs = []
            for k in range(passes):
                step_kwargs = dict(ema=blend) if blend is not None and k == passes - 1 else None
                with g_wrapper.optim_context(self.generator):
                    gen_logs.append(self.train_generator(**data, optimizer_wrapper=g_wrapper,
                                                         step_kwargs=step_kwargs))
            self.discriminator.requires_grad_(True)
            gen_log = _mean_logs(gen_logs)
            gen_log.pop("loss", None)
            log_vars.update(gen_log)
            if self.with_ema_gen:
                if ema_updates:
                    self.generator_ema.update_parameters(generator)
                else:
                    self.generator_ema.sync_parameters(generator)
        return log_vars

    def train_discriminator(self, inputs: dict, data_samples: dict,
                            optimizer_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        real = inputs["img"]
        real_labels = data_samples.get("gt_label")
        noise, fake_labels = self.sample_inputs(real.shape[0])
        with torch.no_grad():
            fake = self.generator(noise, label=fake_labels)
        if real.shape[1:] != fake.shape[1:]:
            # D would take both and train on nonsense (real 128 px against 32 px fakes).
            raise ValueError(f"BigGAN: real images of shape {tuple(real.shape[1:])} but the "
                             f"generator makes {tuple(fake.shape[1:])}; set the dataset's "
                             "img_size to the model's")
        losses = dict(loss_disc_fake=F.relu(1.0 + self.discriminator(fake, label=fake_labels)).mean(),
                      loss_disc_real=F.relu(1.0 - self.discriminator(real, label=real_labels)).mean())
        loss, log_vars = self.parse_losses(losses)
        optimizer_wrapper.update_params(loss)
        return log_vars

    def train_generator(self, inputs: dict, data_samples: dict, optimizer_wrapper: OptimWrapper,
                        step_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        noise, labels = self.sample_inputs(inputs["img"].shape[0])
        fake = self.generator(noise, label=labels)
        loss, log_vars = self.parse_losses(dict(loss_gen=-self.discriminator(fake, label=labels).mean()))
        optimizer_wrapper.update_params(loss, step_kwargs=step_kwargs)
        return log_vars


def _build(cfg, defaults: dict) -> nn.Module:
    if isinstance(cfg, nn.Module):
        return cfg
    return MODELS.build(cfg, default_args=defaults)


def _mean_logs(logs: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    if len(logs) == 1:
        return logs[0]
    return {k: torch.stack([torch.as_tensor(log[k]) for log in logs]).mean() for k in logs[0]}
