# SinGAN with a positional-encoding generator (CSG), 11 scales.
model = dict(type='PESinGAN',
             generator=dict(type='SinGANMSGeneratorPE', in_channels=2, out_channels=3,
                            num_scales=10, positional_encoding=dict(type='CSG')),
             discriminator=dict(type='SinGANMultiScaleDiscriminator', in_channels=3,
                                num_scales=10),
             gan_loss=dict(type='GANLoss', gan_type='wgan', loss_weight=1))
train_cfg = dict(noise_weight_init=0.1, iters_per_scale=2000, curr_scale=-1, disc_steps=3,
                 generator_steps=3, lr_d=0.0005, lr_g=0.0005,
                 lr_scheduler_args=dict(milestones=[1600], gamma=0.1),
                 first_fixed_noises_ch=2)
total_iters = 22000
