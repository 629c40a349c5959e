# Geometric GAN: LSGAN networks trained with the hinge loss.
model = dict(type='StaticUnconditionalGAN',
             generator=dict(type='LSGANGenerator', output_scale=64),
             discriminator=dict(type='LSGANDiscriminator', input_scale=64),
             gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=1)
optimizer = dict(generator=dict(type='Adam', lr=1e-4, betas=(0.5, 0.99)),
                 discriminator=dict(type='Adam', lr=1e-4, betas=(0.5, 0.99)))
total_iters = 160000
