# Test fixture: mmgen's 'Linear' lr policy with a per-group lr_mult on the generator.
_base_ = ['./sngan_base.py']
optimizer = dict(
    generator=dict(type='Adam', lr=0.0002, betas=(0.5, 0.999),
                   paramwise_cfg=dict(custom_keys={'embedding': dict(lr_mult=0.1)})))
lr_config = dict(policy='Linear', by_epoch=False, target_lr=0, start=50000, interval=100)
