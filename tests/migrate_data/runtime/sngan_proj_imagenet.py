# SNGAN with a projection discriminator on ImageNet 128 (five D steps per G step):
# 0.x checkpoint, logger and runner settings of that experiment, and its evaluation
# every 10000 iterations, every 4000 from iteration 800000 on.
model = dict(type='BasiccGAN', num_classes=1000,
             generator=dict(type='SNGANGenerator', output_scale=128, base_channels=64,
                            num_classes=1000),
             discriminator=dict(type='ProjDiscriminator', input_scale=128,
                                base_channels=64, num_classes=1000),
             gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=5)
optimizer = dict(generator=dict(type='Adam', lr=0.0002, betas=(0.0, 0.999)),
                 discriminator=dict(type='Adam', lr=0.00005, betas=(0.0, 0.999)))
lr_config = None
total_iters = 2500000

checkpoint_config = dict(interval=50000, by_epoch=False, max_keep_ckpts=20)
log_config = dict(interval=100, hooks=[dict(type='TextLoggerHook')])
runner = dict(type='DynamicIterBasedRunner', is_dynamic_ddp=False,
              pass_training_status=True)
evaluation = dict(
    type='GenerativeEvalHook',
    interval=dict(milestones=[800000], interval=[10000, 4000]),
    metrics=[dict(type='FID', num_images=50000, bgr2rgb=True,
                  inception_args=dict(type='StyleGAN')),
             dict(type='IS', num_images=50000)],
    best_metric=['fid', 'is'],
    sample_kwargs=dict(sample_model='orig'))
