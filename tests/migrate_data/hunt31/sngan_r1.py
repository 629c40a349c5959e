# Test fixture: MMGeneration 0.x's SNGAN-projection 32x32 config (see ../hunt/) with an
# R1 gradient penalty on the discriminator and a weighted GAN loss, as a user would add.
_base_ = ['../hunt/sngan_base.py']
model = dict(
    gan_loss=dict(loss_weight=0.5),
    disc_auxiliary_loss=dict(
        type='R1GradientPenalty', loss_weight=10., interval=1, norm_mode='HWC',
        data_info=dict(real_data='real_imgs', discriminator='disc')))
