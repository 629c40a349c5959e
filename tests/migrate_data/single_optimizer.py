# Test fixture: a 0.x conditional GAN trained with ONE optimizer over the whole
# model (not a per-network dict), with a paramwise_cfg.
model = dict(
    type='BasiccGAN',
    num_classes=10,
    generator=dict(type='BigGANGenerator', output_scale=32, noise_size=128,
                   num_classes=10, base_channels=64, with_shared_embedding=False,
                   split_noise=False, init_type='N02', auto_sync_bn=False),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10,
                       base_channels=64, init_type='N02'),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=2)
optimizer = dict(type='Adam', lr=0.0002, betas=(0.5, 0.999), weight_decay=1e-4,
                 paramwise_cfg=dict(norm_decay_mult=0.0))
total_iters = 1000
