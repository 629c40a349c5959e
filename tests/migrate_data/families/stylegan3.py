# StyleGAN3-T at 256 px without augmentation: R1 weight 2 (gamma / 2 * 16 = 16) and the
# ramp-up EMA of the official code.
d_ratio = 16 / (16 + 1)
g_ratio = 4 / (4 + 1)
model = dict(type='StaticUnconditionalGAN',
             generator=dict(type='StyleGANv3Generator', out_size=256, style_channels=512,
                            img_channels=3, noise_size=512),
             discriminator=dict(type='StyleGAN2Discriminator', in_size=256),
             gan_loss=dict(type='GANLoss', gan_type='wgan-logistic-ns'),
             disc_auxiliary_loss=dict(type='R1GradientPenalty', loss_weight=2.0 / 2 * 16,
                                      interval=16, norm_mode='HWC',
                                      data_info=dict(real_data='real_imgs',
                                                     discriminator='disc')),
             gen_auxiliary_loss=dict(type='GeneratorPathRegularizer', loss_weight=8.,
                                     pl_batch_shrink=2, interval=4,
                                     data_info=dict(generator='gen',
                                                    num_batches='batch_size')))
train_cfg = dict(use_ema=True)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0025 * g_ratio, betas=(0, 0.99**g_ratio)),
    discriminator=dict(type='Adam', lr=0.002 * d_ratio, betas=(0, 0.99**d_ratio)))
custom_hooks = [dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema',),
                     interp_mode='lerp', interval=1, start_iter=0, momentum_policy='rampup',
                     momentum_cfg=dict(ema_kimg=10, ema_rampup=0.05, batch_size=32,
                                       eps=1e-8),
                     priority='VERY_HIGH')]
total_iters = 800002
