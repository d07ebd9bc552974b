"""The original's ImageNet transforms: per image on the CPU, and their per-pixel arithmetic on
whole batches on the training device.

Training: RandomResizedCrop(size), ColorJitter (brightness, contrast and saturation 0.4) and a
horizontal flip, by torchvision on the PIL image; then, per batch, to [0, 1], the PCA lighting
noise (AlexNet's, with fb.resnet.torch's eigenvalues and eigenvectors, standard deviation 0.1)
and normalisation with ImageNet's mean and std. Test: Resize(256/224 of size), CenterCrop(size),
then normalisation. Images are converted to RGB before any transform.

The original ran everything per image in its loader processes. Here the processes send uint8
images (4x fewer bytes than float) with each image's lighting draw, and the device does the
float arithmetic: the same operations in the same order, as timm's PrefetchLoader does it.
"""
import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = ((-0.5675, 0.7192, 0.4009),
          (-0.5808, -0.0045, -0.8140),
          (-0.5836, -0.6948, 0.4203))
LIGHTING_STD = 0.1
JITTER = 0.4
TEST_RESIZE = 256 / 224  # Resize(256) before CenterCrop(224)


def sample_seed(seed, epoch, index):
    """The seed of one image's random transform: a function of (run seed, epoch, position), so
    that it does not depend on the number of loader processes, their order, or a resume."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2 ** 63


def _transforms():
    from torchvision import transforms  # lazily, as in models.imagenet_resnet

    return transforms


class TrainTransform:
    """PIL image -> (uint8 HWC array, lighting draw (3,)) with the original's random crop,
    colour jitter, flip and lighting draw, drawn from a generator seeded with ``seed``."""

    def __init__(self, size):
        T = _transforms()
        self.pil = T.Compose([T.RandomResizedCrop(size),
                              T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),
                              T.RandomHorizontalFlip()])

    def __call__(self, img, seed):
        # torchvision draws from torch's default generator: seeded here, restored afterwards
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            img = self.pil(img.convert('RGB'))
            alpha = torch.randn(3) * LIGHTING_STD
        return np.array(img, dtype=np.uint8), alpha


class TestTransform:
    """PIL image -> (uint8 HWC array, zero lighting): resize and centre crop."""

    def __init__(self, size):
        T = _transforms()
        self.pil = T.Compose([T.Resize(round(size * TEST_RESIZE)), T.CenterCrop(size)])

    def __call__(self, img, seed=None):
        return np.array(self.pil(img.convert('RGB')), dtype=np.uint8), torch.zeros(3)


class BatchNormalize:
    """uint8 NHWC batch + lighting draws -> normalised float NCHW batch, on ``device``. The
    result has channels-last strides (what the permutation of NHWC gives)."""

    def __init__(self, device, lighting):
        self.lighting = lighting
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device)
        self.mean, self.std = as_tensor(MEAN).view(1, 3, 1, 1), as_tensor(STD).view(1, 3, 1, 1)
        self.eigval, self.eigvec = as_tensor(EIGVAL), as_tensor(EIGVEC)

    def __call__(self, x, alpha):
        x = x.permute(0, 3, 1, 2).float().div_(255)
        if self.lighting:  # the original's per-image (eigvec * alpha * eigval).sum(dim=1)
            rgb = (self.eigvec * alpha[:, None, :] * self.eigval).sum(dim=2)
            x = x + rgb[:, :, None, None]
        return (x - self.mean) / self.std
