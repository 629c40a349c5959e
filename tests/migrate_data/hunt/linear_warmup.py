# Test fixture: mmgen's 'Linear' lr policy from iteration 0 with a linear warm-up.
_base_ = ['./sngan_base.py']
lr_config = dict(policy='Linear', by_epoch=False, target_lr=0, start=0, interval=1,
                 warmup='linear', warmup_iters=1000, warmup_ratio=0.1)
