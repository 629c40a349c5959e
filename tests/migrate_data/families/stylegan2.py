# StyleGAN2 (config-f) at 256 px: lazy R1 every 16 and path-length every 4 iterations,
# Adam rates and betas corrected for the lazy intervals, EMA with a 10k-image half-life.
d_ratio = 16 / (16 + 1)
g_ratio = 4 / (4 + 1)
model = dict(type='StaticUnconditionalGAN',
             generator=dict(type='StyleGANv2Generator', out_size=256, style_channels=512),
             discriminator=dict(type='StyleGAN2Discriminator', in_size=256),
             gan_loss=dict(type='GANLoss', gan_type='wgan-logistic-ns'),
             disc_auxiliary_loss=dict(type='R1GradientPenalty', loss_weight=10. / 2. * 16,
                                      interval=16, norm_mode='HWC',
                                      data_info=dict(real_data='real_imgs',
                                                     discriminator='disc')),
             gen_auxiliary_loss=dict(type='GeneratorPathRegularizer', loss_weight=8.,
                                     pl_batch_shrink=2, interval=4,
                                     data_info=dict(generator='gen',
                                                    num_batches='batch_size')))
train_cfg = dict(use_ema=True)
optimizer = dict(
    generator=dict(type='Adam', lr=0.002 * g_ratio, betas=(0, 0.99**g_ratio)),
    discriminator=dict(type='Adam', lr=0.002 * d_ratio, betas=(0, 0.99**d_ratio)))
custom_hooks = [dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema',),
                     interval=1, interp_cfg=dict(momentum=0.5**(32. / (10 * 1000.))),
                     priority='VERY_HIGH')]
runner = dict(type='DynamicIterBasedRunner', is_dynamic_ddp=True,
              fp16_loss_scaler=dict(init_scale=512))
total_iters = 800002
