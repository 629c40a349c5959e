# SAGAN at 128 px with BigGAN-style settings: one D step, different G / D rates, EMA from 2k.
model = dict(type='BasiccGAN', num_classes=1000,
             generator=dict(type='SAGANGenerator', output_scale=128, base_channels=64,
                            num_classes=1000),
             discriminator=dict(type='ProjDiscriminator', input_scale=128, base_channels=64,
                                num_classes=1000),
             gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=1, use_ema=True)
optimizer = dict(generator=dict(type='Adam', lr=1e-4, betas=(0.0, 0.999)),
                 discriminator=dict(type='Adam', lr=4e-4, betas=(0.0, 0.999)))
custom_hooks = [dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema',),
                     interval=1, start_iter=2000, interp_cfg=dict(momentum=0.999),
                     priority='VERY_HIGH')]
total_iters = 1000000
