# Pix2Pix on facades: train_cfg is None, plural optimizer keys, an L1 pixel loss.
model = dict(type='Pix2Pix',
             generator=dict(type='UnetGenerator', in_channels=3, out_channels=3,
                            num_down=8, base_channels=64, norm_cfg=dict(type='BN'),
                            use_dropout=True),
             discriminator=dict(type='PatchDiscriminator', in_channels=6, base_channels=64,
                                num_conv=3, norm_cfg=dict(type='BN')),
             gan_loss=dict(type='GANLoss', gan_type='vanilla', real_label_val=1.0,
                           fake_label_val=0.0, loss_weight=1.0),
             default_domain='photo', reachable_domains=['photo'],
             related_domains=['photo', 'mask'],
             gen_auxiliary_loss=dict(type='L1Loss', loss_weight=100.0, loss_name='pixel_loss',
                                     data_info=dict(pred='fake_photo', target='real_photo')))
train_cfg = None
test_cfg = None
optimizer = dict(generators=dict(type='Adam', lr=2e-4, betas=(0.5, 0.999)),
                 discriminators=dict(type='Adam', lr=2e-4, betas=(0.5, 0.999)))
lr_config = None
total_iters = 80000
