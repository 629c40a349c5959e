# A BigGAN small enough to train in seconds on a CPU, with the 0.x runtime settings
# of the BigGAN configs at a scale of a few iterations: checkpoints every 4
# iterations (one kept), a log line every 2, evaluation every 4.
model = dict(
    type='BasiccGAN',
    num_classes=10,
    generator=dict(type='BigGANGenerator', output_scale=32, noise_size=128,
                   num_classes=10, base_channels=16, shared_dim=32, init_type='N02'),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10,
                       base_channels=16, init_type='N02'),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=2, gen_steps=1, batch_accumulation_steps=2)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0001, betas=(0.0, 0.999), eps=1e-6),
    discriminator=dict(type='Adam', lr=0.0004, betas=(0.0, 0.999), eps=1e-6))
lr_config = None
total_iters = 8

checkpoint_config = dict(interval=4, by_epoch=False, max_keep_ckpts=1)
log_config = dict(interval=2, hooks=[dict(type='TextLoggerHook')])
runner = dict(type='DynamicIterBasedRunner', is_dynamic_ddp=False,
              pass_training_status=True)
evaluation = dict(type='GenerativeEvalHook', interval=4,
                  metrics=dict(type='FID', num_images=64))
