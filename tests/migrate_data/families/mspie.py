# MS-PIE StyleGAN2: multi-scale training settings live in train_cfg in 0.x.
d_ratio = 16 / (16 + 1)
g_ratio = 4 / (4 + 1)
model = dict(type='MSPIEStyleGAN2',
             generator=dict(type='MSStyleGANv2Generator', out_size=256, style_channels=512,
                            head_pos_encoding=dict(type='CSG')),
             discriminator=dict(type='MSStyleGAN2Discriminator', in_size=256,
                                with_adaptive_pool=True),
             gan_loss=dict(type='GANLoss', gan_type='wgan-logistic-ns'),
             disc_auxiliary_loss=dict(type='R1GradientPenalty', loss_weight=80.,
                                      interval=16, norm_mode='HWC',
                                      data_info=dict(real_data='real_imgs',
                                                     discriminator='disc')),
             gen_auxiliary_loss=dict(type='GeneratorPathRegularizer', loss_weight=8.,
                                     pl_batch_shrink=2, interval=4,
                                     data_info=dict(generator='gen',
                                                    num_batches='batch_size')))
train_cfg = dict(use_ema=True, num_upblocks=6, multi_input_scales=[0, 2, 4],
                 multi_scale_probability=[0.5, 0.25, 0.25])
optimizer = dict(
    generator=dict(type='Adam', lr=0.002 * g_ratio, betas=(0, 0.99**g_ratio)),
    discriminator=dict(type='Adam', lr=0.002 * d_ratio, betas=(0, 0.99**d_ratio)))
custom_hooks = [dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema',),
                     interval=1, interp_cfg=dict(momentum=0.5**(32. / (10 * 1000.))),
                     priority='VERY_HIGH')]
total_iters = 1100002
