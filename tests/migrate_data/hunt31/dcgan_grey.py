# Test fixture: the model, data and optimizer parts of MMGeneration 0.x's
# dcgan_mnist-64 config (grey images: LoadImageFromFile flag='grayscale').
model = dict(
    type='StaticUnconditionalGAN',
    generator=dict(type='DCGANGenerator', output_scale=64, base_channels=1024,
                   out_channels=1),
    discriminator=dict(type='DCGANDiscriminator', input_scale=64, output_scale=4,
                       out_channels=1, in_channels=1),
    gan_loss=dict(type='GANLoss', gan_type='vanilla'))
train_cfg = dict(disc_steps=1)
train_pipeline = [
    dict(type='LoadImageFromFile', key='real_img', flag='grayscale', io_backend='disk'),
    dict(type='Resize', keys=['real_img'], scale=(64, 64)),
    dict(type='Normalize', keys=['real_img'], mean=[127.5], std=[127.5], to_rgb=False),
    dict(type='ImageToTensor', keys=['real_img']),
    dict(type='Collect', keys=['real_img'], meta_keys=['real_img_path'])]
data = dict(samples_per_gpu=128,
            train=dict(type='UnconditionalImageDataset', imgs_root='data/mnist_64/train',
                       pipeline=train_pipeline))
optimizer = dict(
    generator=dict(type='Adam', lr=0.0004, betas=(0.5, 0.999)),
    discriminator=dict(type='Adam', lr=0.0001, betas=(0.5, 0.999)))
total_iters = 5000
