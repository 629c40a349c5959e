# SNGAN with a projection discriminator, CIFAR-10 sized: five D iterations per G update.
model = dict(type='BasiccGAN', num_classes=10,
             generator=dict(type='SNGANGenerator', output_scale=32, base_channels=256,
                            num_classes=10),
             discriminator=dict(type='ProjDiscriminator', input_scale=32, base_channels=128,
                                num_classes=10),
             gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=5)
optimizer = dict(generator=dict(type='Adam', lr=2e-4, betas=(0.5, 0.999)),
                 discriminator=dict(type='Adam', lr=2e-4, betas=(0.5, 0.999)))
total_iters = 500000
data = dict(samples_per_gpu=64)
