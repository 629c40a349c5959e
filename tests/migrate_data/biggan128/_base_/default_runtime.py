# Test fixture: a 0.x-style runtime file (mmcv hooks and runner).
checkpoint_config = dict(interval=10000, by_epoch=False)
log_config = dict(interval=100, hooks=[dict(type='TextLoggerHook')])
custom_hooks = [
    dict(type='VisualizeUnconditionalSamples', output_dir='training_samples',
         interval=1000)
]
runner = dict(type='DynamicIterBasedRunner', is_dynamic_ddp=True,
              pass_training_status=True)
dist_params = dict(backend='nccl')
log_level = 'INFO'
load_from = None
resume_from = None
workflow = [('train', 10000)]
find_unused_parameters = True
cudnn_benchmark = True
