"""The numeric precision of forward passes and losses, chosen once (nanoGPT's ``ctx``)."""
import torch


def autocast(device, amp):
    """bf16 autocast on ``device`` when ``amp``, else fp32 (a context that changes nothing).
    Autocast's weight cache is off: it would hold casts made during a CUDA-graph capture."""
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=amp,
                          cache_enabled=False)
