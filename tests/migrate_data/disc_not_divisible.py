# Test fixture: disc_steps (12) is not a multiple of batch_accumulation_steps (8),
# which 1.x cannot express exactly.
model = dict(
    type='BasiccGAN',
    generator=dict(type='BigGANGenerator', output_scale=32, noise_size=128,
                   num_classes=10, base_channels=64, with_shared_embedding=False,
                   split_noise=False, init_type='N02'),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10,
                       base_channels=64, init_type='N02'),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=12, gen_steps=2, batch_accumulation_steps=8)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999)),
    discriminator=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999)))
total_iters = 24000
