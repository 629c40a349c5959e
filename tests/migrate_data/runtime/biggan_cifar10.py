# BigGAN on CIFAR-10 (2 GPUs x 25 images, 500k iterations) with the 0.x runtime
# settings of that experiment; the text logger is joined by TensorBoard.
model = dict(
    type='BasiccGAN',
    num_classes=10,
    generator=dict(type='BigGANGenerator', output_scale=32, noise_size=128,
                   num_classes=10, base_channels=64, with_shared_embedding=False,
                   sn_eps=1e-8, sn_style='torch', init_type='N02', split_noise=False,
                   auto_sync_bn=False),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10,
                       base_channels=64, sn_eps=1e-8, sn_style='torch', init_type='N02',
                       with_spectral_norm=True),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=4, gen_steps=1, batch_accumulation_steps=1, use_ema=True)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999)),
    discriminator=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999)))
lr_config = None
total_iters = 500000

checkpoint_config = dict(interval=5000, by_epoch=False, max_keep_ckpts=20)
log_config = dict(
    interval=100,
    hooks=[dict(type='TextLoggerHook'), dict(type='TensorboardLoggerHook')])
custom_hooks = [
    dict(type='ExponentialMovingAverageHook', module_keys=('generator_ema', ),
         interval=4, start_iter=4000, interp_cfg=dict(momentum=0.9999),
         priority='VERY_HIGH')
]
runner = dict(type='DynamicIterBasedRunner', is_dynamic_ddp=False,
              pass_training_status=True)
evaluation = dict(
    type='GenerativeEvalHook',
    interval=10000,
    metrics=[dict(type='FID', num_images=50000, inception_pkl=None, bgr2rgb=True),
             dict(type='IS', num_images=50000)],
    sample_kwargs=dict(sample_model='ema'),
    best_metric=['fid', 'is'])
