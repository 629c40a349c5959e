# Test fixture: an mmcv-style top-level fp16. MMGeneration 0.x's apis/train.py reads it only
# with optimizer_cfg set (GAN configs never set it), so this 0.x run trained in fp32.
_base_ = ['./sngan_base.py']
fp16 = dict(loss_scale=512.)
