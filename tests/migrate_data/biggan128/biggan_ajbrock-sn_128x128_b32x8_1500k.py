# Test fixture: the 0.x BigGAN-128 experiment config (32 images x 8 GPUs,
# 1.5M iterations) on top of the model, dataset and runtime base files.
_base_ = [
    './_base_/models/biggan_128x128.py',
    './_base_/datasets/imagenet_noaug_128.py',
    './_base_/default_runtime.py',
]

data = dict(samples_per_gpu=32, workers_per_gpu=8)

lr_config = None
checkpoint_config = dict(interval=5000, by_epoch=False, max_keep_ckpts=10)
custom_hooks = [
    dict(type='VisualizeUnconditionalSamples', output_dir='training_samples',
         interval=10000),
    dict(
        type='ExponentialMovingAverageHook',
        module_keys=('generator_ema', ),
        interval=8,
        start_iter=160000,
        interp_cfg=dict(momentum=0.9999, momentum_nontrainable=0.9999),
        priority='VERY_HIGH'),
]

total_iters = 1500000

use_ddp_wrapper = True
find_unused_parameters = False
runner = dict(type='DynamicIterBasedRunner', is_dynamic_ddp=False,
              pass_training_status=True)

evaluation = dict(
    type='GenerativeEvalHook',
    interval=10000,
    metrics=[dict(type='FID', num_images=50000, bgr2rgb=True),
             dict(type='IS', num_images=50000)],
    sample_kwargs=dict(sample_model='ema'),
    best_metric=['fid', 'is'])
