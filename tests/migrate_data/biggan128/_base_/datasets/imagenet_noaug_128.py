# Test fixture: a 0.x-style class-conditional image dataset file.
dataset_type = 'mmcls.ImageNet'
img_norm_cfg = dict(mean=[127.5] * 3, std=[127.5] * 3, to_rgb=False)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', size=(128, 128), backend='pillow'),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='ImageToTensor', keys=['img']),
    dict(type='Collect', keys=['img', 'gt_label']),
]
data = dict(
    samples_per_gpu=None,
    workers_per_gpu=2,
    train=dict(type=dataset_type, data_prefix='data/imagenet/train',
               pipeline=train_pipeline))
