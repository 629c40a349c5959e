# LSGAN: DCGAN networks trained with the least-squares loss.
model = dict(type='StaticUnconditionalGAN',
             generator=dict(type='DCGANGenerator', output_scale=64, base_channels=1024),
             discriminator=dict(type='DCGANDiscriminator', input_scale=64, output_scale=4,
                                out_channels=1),
             gan_loss=dict(type='GANLoss', gan_type='lsgan'))
train_cfg = dict(disc_steps=1)
optimizer = dict(generator=dict(type='Adam', lr=1e-3, betas=(0.5, 0.99)),
                 discriminator=dict(type='Adam', lr=1e-3, betas=(0.5, 0.99)))
total_iters = 100000
