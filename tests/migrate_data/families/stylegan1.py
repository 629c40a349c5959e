# StyleGAN v1 at 256 px: progressive growing like PGGAN, optimizers in train_cfg.
model = dict(type='StyleGANV1',
             generator=dict(type='StyleGANv1Generator', out_size=256, style_channels=512),
             discriminator=dict(type='StyleGAN1Discriminator', in_size=256),
             gan_loss=dict(type='GANLoss', gan_type='wgan-logistic-ns'),
             disc_auxiliary_loss=[dict(type='R1GradientPenalty', loss_weight=10,
                                       norm_mode='HWC',
                                       data_info=dict(discriminator='disc_partial',
                                                      real_data='real_imgs'))])
train_cfg = dict(
    use_ema=True, transition_kimgs=600,
    optimizer_cfg=dict(generator=dict(type='Adam', lr=0.001, betas=(0.0, 0.99)),
                       discriminator=dict(type='Adam', lr=0.001, betas=(0.0, 0.99))),
    g_lr_base=0.001, d_lr_base=0.001,
    g_lr_schedule={'128': 0.0015, '256': 0.002}, d_lr_schedule={'128': 0.0015, '256': 0.002},
    nkimgs_per_scale={'8': 1200, '16': 1200, '32': 1200, '64': 1200, '128': 1200,
                      '256': 190000})
optimizer = None
custom_hooks = [dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema',),
                     interval=1, interp_cfg=dict(momentum=0.5**(32. / (10 * 1000.))),
                     priority='VERY_HIGH')]
total_iters = 670000
