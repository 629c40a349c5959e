# Test fixture: a 0.x SNGAN-projection config (the structure of MMGeneration's
# sngan_proj 32x32 config), the base of the other configs in this folder.
model = dict(
    type='BasiccGAN',
    generator=dict(type='SNGANGenerator', output_scale=32, num_classes=10, base_channels=256),
    discriminator=dict(type='ProjDiscriminator', input_scale=32, num_classes=10,
                       base_channels=128),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=5)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0002, betas=(0.5, 0.999)),
    discriminator=dict(type='Adam', lr=0.0002, betas=(0.5, 0.999)))
total_iters = 100000
