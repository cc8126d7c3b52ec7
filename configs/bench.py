"""bench.py's settings: every method on one checkpoint, the same classes and seeds.

  python bench.py --config=configs/bench.py --out_dir=docs/bench          # docs/results.md
  python bench.py --config=configs/bench.py --config.num_images_by_method.sjd=512 --out_dir=/tmp/b
  python bench.py --config=configs/bench.py:smoke --out_dir=/tmp/b         # seconds

Speed alone, per batch size and against the floor of a bare forward: configs/speed.py.

Each setting is (method, {option: value}) with the method's own option names (see
`python sample.py --help`: --ssd_rounds is ('ssd', {'rounds': ...})). An ablation is a
small config that imports this one and changes `settings`. Plain AR always runs first at
`seed` (the baseline of every speed-up) and again at `noise_seed` (the noise level of FID).

Images: `num_images` for AR (both seeds) and every method, but `num_images_by_method` for
the methods it lists (the slow ones: 256). A setting with n images is compared with AR's
first n images, against the noise level at n (AR vs AR over the first n); `fid.bootstrap`
resamples give each of them an interval (the noise level's: the two AR runs' images i
swapped at random; a setting's: a paired bootstrap), so a real fidelity loss shows apart
from noise.
"""

import ml_collections

SETTINGS = (
    ('speculative', {}),
    ('ssd', {'rounds': 0}),
    ('ssd', {'rounds': 1}),
    ('ssd', {'rounds': 2}),
    ('sjd', {}),
    ('gsd', {}),
    ('lantern', {}),
    ('zipar', {}),
    ('hawk', {}),
    ('mulo', {}),
)


def sampling():
  config = ml_collections.ConfigDict()
  config.temperature = 1.0  # 0 = greedy.
  config.top_k = 0  # 0 = off.
  config.top_p = 1.0  # 1 = off.
  config.cfg_scale = 2.0  # Classifier-free guidance; 1 = off.
  return config


def get_config(arg=''):
  config = ml_collections.ConfigDict()
  config.mode = 'fidelity'  # bench.py's job: speed and fidelity (configs/speed.py: speed only).
  config.checkpoint = ''  # Run folder; '' = the release in checkpoints/fmnist.
  config.settings = SETTINGS  # (method, {option: value}) pairs compared with plain AR.
  # 1000 for mulo too (6x AR's run time): at 256 the noise level hid its fidelity loss.
  config.num_images = 1000  # Images of AR (both seeds) and of every method not below.
  # Images of the slow methods (at most num_images: FID vs AR uses AR's first n images).
  # Another method's own count needs a config: a locked config takes no new keys.
  config.num_images_by_method = ml_collections.ConfigDict()
  config.num_images_by_method.sjd = 256  # 4.7x AR's run time per image on 2 CPU cores.
  config.num_images_by_method.gsd = 256  # 4.4x AR's.
  config.num_images_by_method.lantern = 256  # 1.6x AR's.
  config.num_images_by_method.zipar = 256  # 2.1x AR's.
  config.num_images_by_method.hawk = 256  # 4.8x AR's.
  config.batch_size = 16  # Images per decoding batch.
  config.classes = ()  # Class ids, cycled; () = all classes.
  config.seed = 0  # Seed of every setting (image i uses fold_in(key(seed), i)).
  config.noise_seed = -1  # Seed of the second AR sample (the noise level); -1 = seed + 1.

  config.sampling = sampling()  # How every setting samples.

  config.fid = ml_collections.ConfigDict()
  config.fid.classifier = ''  # Classifier stage folder; '' = <checkpoint>/classifier.
  config.fid.features = 'classifier'  # FID features: classifier, pkg.mod:factory, file.py:f.
  config.fid.features_path = ''  # Passed to the factory (e.g. Inception weights).
  config.fid.data_name = 'fashion_mnist_local'  # tfds dataset of the real images.
  config.fid.data_dir = ''  # tfds data_dir; '' = the default.
  config.fid.idx_dir = ''  # Fashion-MNIST IDX folder; '' = Debian's package location.
  config.fid.split = 'test'  # Split of the real images.
  config.fid.num_real = 10000  # Real images for FID, at most.
  config.fid.bootstrap = 200  # Resamples behind each FID interval (noise, rows); 0 = none.
  config.fid.interval = 0.9  # Probability mass of those intervals (central percentiles).

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Devices on the 'data' axis (-1: all).
  config.mesh.model = 1  # Devices on the 'model' axis.
  config.progress = True  # Progress bars.

  if arg == 'smoke':
    config.settings = (('speculative', {}), ('ssd', {'rounds': 1}))
    config.num_images = 8
    # A second image count, so the smoke bench compares at two sizes.
    config.num_images_by_method = ml_collections.ConfigDict({'ssd': 4})
    config.batch_size = 8
    config.fid.num_real = 200
    config.fid.bootstrap = 20
  elif arg:
    raise ValueError(f'configs/bench.py:{arg}: the variants are "" and "smoke".')
  return config
