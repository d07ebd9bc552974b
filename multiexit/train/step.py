"""The training step and the epoch's accumulators, eager or replayed as one CUDA graph.

A step is forward, the loss (which may raise its temperature in place), backward, the optimizer
update, and the accumulation of the loss, the first non-finite step and the metrics, all on the
device. ``GraphedTrainStep`` captures that whole step once and replays it for every batch:
MsdNet at batch 64 is thousands of small kernels, whose launch cost dominates an eager step.
A step trains ``members`` runs at once (K >= 1): those of a pack (``multiexit.models.fused``),
whose loss returns each member's, or a run alone (K = 1, its loss a scalar). The accumulators
are per member.
"""
import torch

from ..accel import distributed, streams
from ..accel.cuda_graph import GraphedCall
from ..accel.precision import autocast
from ..metrics import MultiExitAccuracy
from ..models.batchnorm import count_batches


class TrainStep:
    """Eager training step; ``finish_epoch()`` returns what the epoch accumulated.
    ``cuda_streams``: the model's independent branches on parallel CUDA streams
    (``multiexit.accel.streams``; nothing changes on the CPU)."""

    def __init__(self, model, loss_fn, optimizer, n_exits, acc_tops, device, amp=False, T=None,
                 cuda_streams=False, members=1):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.device = torch.device(device)
        self.amp, self.T, self.cuda_streams, self.members = amp, T, cuda_streams, members
        self.metrics = MultiExitAccuracy(n_exits, acc_tops, self.device, members)
        self.loss_sum = torch.zeros(members, device=self.device)
        self.first_bad = torch.full((members,), -1, dtype=torch.int64, device=self.device)
        self.step_index = torch.zeros((), dtype=torch.int64, device=self.device)
        self.n_steps = 0

    def start_epoch(self):
        """Zero the accumulators in place (a captured graph holds their addresses)."""
        self.model.train()
        self.loss_fn.train()
        self.metrics.reset()
        self.loss_sum.zero_()
        self.first_bad.fill_(-1)
        self.step_index.zero_()
        self.n_steps = 0

    def step(self, x, y):
        """One step on the batch (x, y): what runs eagerly, and what a graph captures. Its
        gradients are set to None first, so that backward allocates them (in a capture: in the
        graph's memory, which every replay writes)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp), streams.parallel(self.device, self.cuda_streams):
            logits = self.model(x)
            self.metrics.update(logits, y, self.T)  # before the loss, which may raise T in place
            loss = self.loss_fn(logits, y).reshape(self.members)  # a run alone's: a scalar
        loss.sum().backward()
        self.optimizer.step()
        loss = loss.detach()
        self.loss_sum += loss
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self.step_index, self.first_bad))
        self.step_index += 1

    def __call__(self, x, y):
        self.step(x, y)
        self.n_steps += 1

    def finish_epoch(self, world_size=1):
        """(mean losses, metrics dicts, indices of the first non-finite step or None): lists
        of one per member. With a sharded loader (``world_size`` > 1, model in DDP) these are
        the global batches', on every rank."""
        count_batches(self.model, self.n_steps)  # BatchNorm's step counters, once per epoch
        first_bad, loss_sum = self.first_bad, self.loss_sum
        if world_size > 1:
            self.metrics.sum_over_ranks()
            loss_sum = distributed.mean_over_ranks(loss_sum)  # equal parts: the global loss
            first_bad = torch.where(first_bad < 0, self.n_steps, first_bad)
            first_bad = distributed.min_over_ranks_(first_bad)
            first_bad = torch.where(first_bad == self.n_steps, -1, first_bad)
        metrics = self.metrics.compute()  # host sync, once per epoch
        bad_steps, loss_sums = first_bad.tolist(), loss_sum.tolist()  # host sync, once per epoch
        return ([total / max(self.n_steps, 1) for total in loss_sums], metrics,
                [bad if bad >= 0 else None for bad in bad_steps])


class GraphedTrainStep(TrainStep):
    """The same step, captured as one CUDA graph and replayed for every batch
    (``accel.cuda_graph.GraphedCall``; CUDA only, or ``graphs``, a stand-in for tests).

    The first ``warmup`` steps run eagerly on a side stream; they are real training steps.
    With torch.compile, the first of them compiles the forward pass, then at its backward the
    backward pass, and launches every generated kernel once (Triton's autotuning happens at a
    kernel's first launch; 'max-autotune' tunes while compiling): the capture runs compiled
    code only. With ``cuda_streams``, the warm-up steps use the very side streams that the
    capture forks to, and so set up their cuDNN and cuBLAS state. The next batch is captured
    into static input tensors and replayed; later batches are copied into them. Every buffer
    the step writes (weights, gradients, momentum, BatchNorm statistics, the loss temperature,
    the accumulators) keeps its address, so a replay is the eager step. The learning rate is a
    constant of the captured update, so a new one (the scheduler's milestones, a resumed run)
    is captured afresh. Batches must keep one shape (training drops the last incomplete
    batch). If the capture fails, one warning line is printed and training goes on eagerly.
    """

    def __init__(self, *args, warmup=3, graphs=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device.type != 'cuda' and graphs is None:
            raise ValueError('GraphedTrainStep needs a CUDA device')
        self.graph = GraphedCall(self.step, 'the training step', 'training goes on eagerly '
                                 '(set cuda_graph=False to skip the attempt)', warmup=warmup,
                                 key=self._lrs, other_shapes='raise', graphs=graphs)

    def _lrs(self):
        return tuple(float(group['lr']) for group in self.optimizer.param_groups)

    @property
    def captures(self):
        return self.graph.captures

    @property
    def eager_only(self):
        """Whether a capture failed (the step runs eagerly from then on)."""
        return self.graph.eager_only

    def __call__(self, x, y):
        self.graph(x, y)
        self.n_steps += 1


def build_step(model, loss_fn, optimizer, n_exits, acc_tops, device, amp=False, T=None,
               cuda_graph=False, compile=None, cuda_streams=False, members=1):
    """The training step: a GraphedTrainStep when ``cuda_graph`` (on CUDA), else the eager
    TrainStep.

    ``compile``: a torch.compile mode for the model and the loss. Inside our graph,
    'max-autotune' compiles without torch.compile's own CUDA graphs
    ('max-autotune-no-cudagraphs'), as ours holds the whole step; 'reduce-overhead' is nothing
    but those graphs and so is refused there. ``cuda_streams``: the model's independent
    branches on parallel streams; not with ``compile``, whose generated code orders the kernels.
    ``members``: the K runs of a pack at once, 1 for a run alone (``TrainStep``).
    """
    graphed = cuda_graph and torch.device(device).type == 'cuda'
    if compile:
        if graphed and compile == 'reduce-overhead':
            raise ValueError("compile='reduce-overhead' captures CUDA graphs of its own: "
                             'not inside the whole-step graph (cuda_graph)')
        mode = 'max-autotune-no-cudagraphs' if graphed and compile == 'max-autotune' else compile
        model, loss_fn = torch.compile(model, mode=mode), torch.compile(loss_fn, mode=mode)
    cls = GraphedTrainStep if graphed else TrainStep
    return cls(model, loss_fn, optimizer, n_exits, acc_tops, device, amp=amp, T=T,
               cuda_streams=cuda_streams and not compile, members=members)
