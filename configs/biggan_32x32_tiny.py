# A tiny BigGAN (32x32, base_channels 16, 10 classes) that trains in seconds on a
# CPU: for demos and tests. Same schedule and optimizer settings as BigGAN-128,
# with accumulation 2 instead of 8.
_base_ = ['./biggan_128x128_fused.py']

model = dict(
    num_classes=10,
    generator=dict(output_scale=32, num_classes=10, base_channels=16, shared_dim=32),
    discriminator=dict(input_scale=32, num_classes=10, base_channels=16),
    ema_config=dict(type='ExponentialMovingAverage', interval=1, momentum=0.0001,
                    update_buffers=True, start_iter=2))

optim_wrapper = dict(
    generator=dict(accumulative_counts=2),
    discriminator=dict(accumulative_counts=2))

train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(num_samples=64, img_size=32, num_classes=10))
train_cfg = dict(max_iters=20)
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=10, max_keep_ckpts=2))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
