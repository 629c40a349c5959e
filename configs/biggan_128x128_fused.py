# BigGAN-128 with pygan_optim's fused optimizer and wrappers: only names change.
_base_ = ['./biggan_128x128.py']

optim_wrapper = dict(
    generator=dict(type='FusedOptimWrapper', optimizer=dict(type='FusedAdam')),
    discriminator=dict(type='FusedOptimWrapper', optimizer=dict(type='FusedAdam')))
