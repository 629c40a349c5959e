# Improved DDPM on CIFAR-10: a diffusion model with one optimizer for its denoising UNet.
model = dict(type='BasicGaussianDiffusion', num_timesteps=4000,
             betas_cfg=dict(type='cosine'),
             denoising=dict(type='DenoisingUnet', image_size=32, in_channels=3,
                            base_channels=128),
             timestep_sampler=dict(type='UniformTimeStepSampler'))
train_cfg = dict(use_ema=True, real_img_key='img')
optimizer = dict(denoising=dict(type='AdamW', lr=1e-4, weight_decay=0))
custom_hooks = [dict(type='ExponentialMovingAverageHook', module_keys=('denoising_ema',),
                     interval=1, start_iter=0, interp_cfg=dict(momentum=0.9999))]
total_iters = 500000
