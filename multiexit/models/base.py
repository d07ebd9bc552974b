"""What every multi-exit model shares: the forward pass over blocks and their exit heads."""
from torch import nn

from .. import streams


class MultiExitNet(nn.Module):
    """Subclasses fill ``blocks`` and ``exits`` (see the contract in ``multiexit.models``)."""

    @staticmethod
    def exit_features(h):
        """What an exit head reads of a block's output (all of it, unless overridden)."""
        return h

    def forward(self, x):
        logits = []
        for block, head in zip(self.blocks, self.exits):
            x = block(x)
            # nothing in the backbone waits for an exit head: a side stream (multiexit.streams)
            logits.append(streams.aside(head, self.exit_features(x)))
        return streams.join(logits)
