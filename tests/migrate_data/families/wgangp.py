# WGAN-GP at 128 px: Wasserstein loss, gradient penalty of weight 50, five D iterations.
model = dict(type='StaticUnconditionalGAN',
             generator=dict(type='WGANGPGenerator', noise_size=128, out_scale=128),
             discriminator=dict(type='WGANGPDiscriminator', in_channel=3, in_scale=128,
                                conv_module_cfg=dict(norm_cfg=dict(type='GN'))),
             gan_loss=dict(type='GANLoss', gan_type='wgan'),
             disc_auxiliary_loss=[dict(type='GradientPenaltyLoss', loss_weight=50,
                                       norm_mode='HWC',
                                       data_info=dict(discriminator='disc',
                                                      real_data='real_imgs',
                                                      fake_data='fake_imgs'))])
train_cfg = dict(disc_steps=5)
optimizer = dict(generator=dict(type='Adam', lr=1e-4, betas=(0.5, 0.9)),
                 discriminator=dict(type='Adam', lr=1e-4, betas=(0.5, 0.9)))
total_iters = 160000
