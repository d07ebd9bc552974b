"""The original code's training mechanics, kept to measure against and to test equivalence.

Per-image torchvision transforms on PIL images in a DataLoader without workers, fp32, eager,
and a temperature kept as a Python float, updated after a host sync every step.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class PadCrop:
    """Shift by (dy, dx) uniform in {-pad..pad}, filling with 0 (the original's PadCrop)."""

    def __init__(self, pad):
        self.pad = pad

    def __call__(self, img):
        dy, dx = np.random.randint(-self.pad, self.pad + 1, size=2)
        out = torch.zeros_like(img)
        h, w = img.shape[-2:]
        out[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = \
            img[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
        return out


class PilImages(Dataset):
    def __init__(self, images, labels, transform):
        self.images = np.ascontiguousarray(np.asarray(images).transpose(0, 2, 3, 1))  # HWC
        self.labels = np.asarray(labels)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def loader(images, labels, batch_size, mean, std, augment, train):
    steps = [transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    steps += [PadCrop(4)] if augment else []
    return DataLoader(PilImages(images, labels, transforms.Compose(steps)), batch_size,
                      shuffle=train, drop_last=train, num_workers=0)


def cross_entropy(logits, y):
    """The original's F.cross_entropy: the mean over the examples whose label is not -100."""
    return F.cross_entropy(logits, y, ignore_index=-100)


def soft_cross_entropy(prob_t, logits, T):
    """H(p, q) = -mean_batch sum_k p_k log q_k with q = softmax(z / T) (reference README,
    section 2). Written out here, not imported from multiexit.losses, so that the equivalence
    test compares that module with the original's formulas rather than with itself."""
    return -(prob_t * F.log_softmax(logits / T, dim=1)).sum(dim=1).mean()


class DistillationBasedLoss:
    """DBT as the original computed it: T a Python float, raised after a host sync."""

    def __init__(self, C, maxprob, n_exits, Tmult=1.05, global_scale=1.0, **unused):
        self.C, self.maxprob, self.Tmult, self.global_scale = C, maxprob, Tmult, global_scale
        self.T = 1.0

    def __call__(self, logits_list, y):
        teacher = logits_list[-1]
        loss = (1.0 - self.C) * cross_entropy(teacher, y)
        prob_t = F.softmax(teacher.detach() / self.T, dim=1)
        for z in logits_list[:-1]:
            loss = loss + (1.0 - self.C) * cross_entropy(z, y)
            loss = loss + self.T ** 2 * self.C * soft_cross_entropy(prob_t, z, self.T)
        if prob_t.max(dim=1)[0].mean() > self.maxprob:  # host sync, every step
            self.T *= self.Tmult
        return loss * self.global_scale


def train_step(model, loss_fn, optimizer, x, y):
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()
