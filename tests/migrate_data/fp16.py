# Test fixture: 0.x native mixed precision through the dynamic runner's
# fp16_loss_scaler, plus a setting the migration tool does not know.
model = dict(
    type='BasiccGAN',
    generator=dict(type='BigGANGenerator', output_scale=32, noise_size=128,
                   num_classes=10, base_channels=64, with_shared_embedding=False,
                   split_noise=False, init_type='N02'),
    discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10,
                       base_channels=64, init_type='N02'),
    gan_loss=dict(type='GANLoss', gan_type='hinge'))
train_cfg = dict(disc_steps=2, batch_accumulation_steps=2)
optimizer = dict(
    generator=dict(type='Adam', lr=0.0001, betas=(0.0, 0.999)),
    discriminator=dict(type='Adam', lr=0.0004, betas=(0.0, 0.999)))
runner = dict(type='DynamicIterBasedRunner', is_dynamic_ddp=False,
              pass_training_status=True, fp16_loss_scaler=dict(init_scale=512.0))
total_iters = 10000
my_custom_setting = dict(answer=42)
