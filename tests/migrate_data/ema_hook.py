# Test fixture: a 0.x CIFAR-style BigGAN with 4 discriminator iterations per
# generator update and an EMA hook on generator_ema (buffers copied: the
# hook's momentum_nontrainable keeps its default 0).
model = dict(
    type='BasiccGAN',
    num_classes=10,
    generator=dict(type='BigGANGenerator', output_scale=32, noise_size=128,
                   num_classes=10, base_channels=64, with_shared_embedding=False,
                   sn_style='torch', split_noise=False, init_type='N02',
                   auto_sync_bn=False),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10,
                       base_channels=64, sn_style='torch', init_type='N02'),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=4, gen_steps=1, use_ema=True)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999)),
    discriminator=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999)))
custom_hooks = [
    dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema', ),
         interval=4, start_iter=4000, interp_cfg=dict(momentum=0.9999),
         priority='VERY_HIGH'),
]
total_iters = 500000
