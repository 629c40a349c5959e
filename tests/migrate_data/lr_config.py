# Test fixture: 0.x linear learning-rate decay (mmgen's LinearLrUpdaterHook)
# with different generator and discriminator learning rates.
model = dict(
    type='BasiccGAN',
    generator=dict(type='SNGANGenerator', output_scale=32, num_classes=10,
                   base_channels=64),
    discriminator=dict(type='ProjDiscriminator', input_scale=32, num_classes=10,
                       base_channels=64),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=5)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0002, betas=(0.5, 0.999)),
    discriminator=dict(type='Adam', lr=0.00005, betas=(0.5, 0.999)))
lr_config = dict(policy='Linear', by_epoch=False, target_lr=0, start=100000,
                 interval=1000)
total_iters = 200000
