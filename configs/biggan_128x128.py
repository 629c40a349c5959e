# BigGAN-128 (the seed config of MMagic's GAN optimizer migration guide), trained on
# plain MMEngine: `pygan-optim train configs/biggan_128x128.py --work-dir work_dirs/biggan`.
# Data: a synthetic dataset (no download); see README "Real data" to plug in images.
custom_imports = dict(imports=['pygan_optim'], allow_failed_imports=False)

model = dict(
    type='BigGAN',
    num_classes=1000,
    data_preprocessor=dict(type='DataPreprocessor'),
    generator=dict(
        type='BigGANGenerator', output_scale=128, noise_size=120, num_classes=1000,
        base_channels=96, shared_dim=128, with_shared_embedding=True, sn_eps=1e-6,
        init_cfg=dict(type='ortho'), act_cfg=dict(type='ReLU', inplace=True), split_noise=True,
        auto_sync_bn=False),
    discriminator=dict(
        type='BigGANDiscriminator', input_scale=128, num_classes=1000, base_channels=96,
        sn_eps=1e-6, init_cfg=dict(type='ortho'), act_cfg=dict(type='ReLU', inplace=True),
        with_spectral_norm=True),
    generator_steps=1,
    discriminator_steps=1)

optim_wrapper = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(accumulative_counts=8,
                   optimizer=dict(type='Adam', lr=0.0001, betas=(0.0, 0.999), eps=1e-6)),
    discriminator=dict(accumulative_counts=8,
                       optimizer=dict(type='Adam', lr=0.0004, betas=(0.0, 0.999), eps=1e-6)))

train_dataloader = dict(
    batch_size=32,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='SyntheticImageDataset', num_samples=50000, img_size=128,
                 num_classes=1000))
train_cfg = dict(by_epoch=False, max_iters=1500000)

default_scope = None
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=10000, by_epoch=False, max_keep_ckpts=5),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None)
custom_hooks = [dict(type='ExactResumeHook')]
