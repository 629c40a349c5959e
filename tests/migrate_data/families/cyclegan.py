# CycleGAN on facades: plural optimizer keys, linear lr decay over the second half.
domain_a, domain_b = 'mask', 'photo'
model = dict(type='CycleGAN',
             generator=dict(type='ResnetGenerator', in_channels=3, out_channels=3,
                            base_channels=64, norm_cfg=dict(type='IN'), num_blocks=9),
             discriminator=dict(type='PatchDiscriminator', in_channels=3, base_channels=64,
                                num_conv=3, norm_cfg=dict(type='IN')),
             gan_loss=dict(type='GANLoss', gan_type='lsgan', real_label_val=1.0,
                           fake_label_val=0.0, loss_weight=1.0),
             default_domain=domain_b,
             reachable_domains=[domain_a, domain_b],
             related_domains=[domain_a, domain_b],
             gen_auxiliary_loss=[
                 dict(type='L1Loss', loss_weight=10.0, loss_name='cycle_loss',
                      data_info=dict(pred=f'cycle_{d}', target=f'real_{d}'))
                 for d in (domain_a, domain_b)] + [
                 dict(type='L1Loss', loss_weight=0.5, loss_name='id_loss',
                      data_info=dict(pred=f'identity_{d}', target=f'real_{d}'))
                 for d in (domain_a, domain_b)])
train_cfg = dict(buffer_size=50)
optimizer = dict(generators=dict(type='Adam', lr=0.0002, betas=(0.5, 0.999)),
                 discriminators=dict(type='Adam', lr=0.0002, betas=(0.5, 0.999)))
lr_config = dict(policy='Linear', by_epoch=False, target_lr=0, start=40000, interval=400)
total_iters = 80000
