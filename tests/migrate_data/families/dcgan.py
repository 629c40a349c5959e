# DCGAN on 64 px MNIST: the unconditional static GAN with the vanilla loss.
model = dict(type='StaticUnconditionalGAN',
             generator=dict(type='DCGANGenerator', output_scale=64, base_channels=1024),
             discriminator=dict(type='DCGANDiscriminator', input_scale=64, output_scale=4,
                                out_channels=1),
             gan_loss=dict(type='GANLoss', gan_type='vanilla'))
train_cfg = dict(disc_steps=1)
optimizer = dict(generator=dict(type='Adam', lr=4e-4, betas=(0.5, 0.999)),
                 discriminator=dict(type='Adam', lr=1e-4, betas=(0.5, 0.999)))
total_iters = 5000
