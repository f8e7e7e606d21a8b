"""Dense ResNet-20 on CIFAR-10, read from a folder you give (nothing is downloaded).

    python -m experiments.main --config=configs/resnet20_cifar10.py --workdir=runs/resnet20 \
        --config.dataset.data_dir=/data/cifar10

``config.dataset.data_dir`` is the ``cifar-10-batches-py`` folder of ``cifar-10-python.tar.gz``
or a folder containing it; a missing folder or file stops the run with a ValueError naming the
key and the path, before anything is written to the workdir.

The CIFAR-10 ResNet of He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition"
(2016), Sec. 4.2: a 3x3 conv of 16 channels, three stages of 3 basic blocks (two 3x3 convs
each) at 16, 32 and 64 channels, the first block of stages 2 and 3 halving the resolution,
parameter-free (option A) shortcuts, global average pooling and a 10-way dense layer: 6n + 2 =
20 weighted layers, 0.27M parameters. The paper's recipe: SGD with momentum 0.9, learning rate
0.1, weight decay 1e-4 (coupled L2, as in the paper), batch 128, 64k iterations.

Differences from the paper, all from what `experiments` offers:
- GroupNorm (8 groups; Wu & He, "Group Normalization", 2018) where the paper has BatchNorm:
  `experiments.models.ResNet` keeps no mutable batch statistics.
- Cosine decay of the learning rate over the 64k steps instead of dividing it by 10 at 32k and
  48k (`experiments.optim` has constant and cosine schedules).
- No data augmentation (the paper pads 4 pixels, crops 32x32 at random and flips): the batches
  are the normalized images as stored. Expect a higher test error than the paper's 8.75%.
"""

import ml_collections

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg=None):
    """ResNet-20; ``arg='runlocal'`` shrinks the run to seconds (ResNet-8 at 8/16/32 channels)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    config.dataset.name = "cifar10"
    config.model = ml_collections.ConfigDict(
        {
            "name": "resnet",
            "api": "linen",
            "num_blocks_per_stage": 1 if runlocal else 3,
            "stage_widths": (8, 16, 32) if runlocal else (16, 32, 64),
            "norm": "group",
            "num_groups": 8,
        }
    )
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 1e-4
    config.total_steps = 64_000
    config.batch_size = 128
    # An epoch is 390 steps of 128 of the 50,000 training images.
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 4000
    if runlocal:
        shrink_for_runlocal(config)
    return config
