"""The training step and the epoch's accumulators, eager or replayed as one CUDA graph.

A step is forward, the loss (which may raise its temperature in place), backward, the optimizer
update, and the accumulation of the loss, the first non-finite step and the metrics, all on the
device. ``GraphedTrainStep`` captures that whole step once and replays it for every batch:
MsdNet at batch 64 is thousands of small kernels, whose launch cost dominates an eager step.
With ``members=K`` a step trains the K members of a pack (``multiexit.models.fused``) at once: the loss
returns each member's, and the accumulators are per member.
"""
import sys

import torch

from ..accel import distributed, streams
from ..metrics import MultiExitAccuracy
from ..models.batchnorm import count_batches


class TrainStep:
    """Eager training step; ``finish_epoch()`` returns what the epoch accumulated.
    ``cuda_streams``: the model's independent branches on parallel CUDA streams
    (``multiexit.accel.streams``; nothing changes on the CPU)."""

    def __init__(self, model, loss_fn, optimizer, n_exits, acc_tops, device, amp=False, T=None,
                 cuda_streams=False, members=None):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.device = torch.device(device)
        self.amp, self.T, self.cuda_streams, self.members = amp, T, cuda_streams, members
        self.metrics = MultiExitAccuracy(n_exits, acc_tops, self.device, members)
        per = () if members is None else (members,)
        self.loss_sum = torch.zeros(per, device=self.device)
        self.first_bad = torch.full(per, -1, dtype=torch.int64, device=self.device)
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

    def _forward_backward_update(self, x, y):
        # autocast's weight cache would hold casts made during a capture: off, for every path
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp,
                            cache_enabled=False), streams.parallel(self.device, self.cuda_streams):
            logits = self.model(x)
            self.metrics.update(logits, y, self.T)  # before the loss, which may raise T in place
            loss = self.loss_fn(logits, y)
        (loss.sum() if self.members else loss).backward()
        self.optimizer.step()
        loss = loss.detach()
        self.loss_sum += loss
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self.step_index, self.first_bad))
        self.step_index += 1

    def __call__(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        self._forward_backward_update(x, y)
        self.n_steps += 1

    def finish_epoch(self, world_size=1):
        """(mean loss, metrics dict, index of the first non-finite step or None), or with
        ``members`` a list of each. With a sharded loader (``world_size`` > 1, model in DDP)
        these are the global batches', on every rank."""
        count_batches(self.model, self.n_steps)  # BatchNorm's step counters, once per epoch
        first_bad, loss_sum = self.first_bad, self.loss_sum
        if world_size > 1:
            self.metrics.sum_over_ranks()
            loss_sum = distributed.mean_over_ranks(loss_sum)  # equal parts: the global loss
            first_bad = torch.where(first_bad < 0, self.n_steps, first_bad)
            first_bad = distributed.min_over_ranks_(first_bad)
            first_bad = torch.where(first_bad == self.n_steps, -1, first_bad)
        out = self.metrics.compute()  # host sync, once per epoch
        bad_steps, loss_sums = first_bad.tolist(), loss_sum.tolist()  # host sync, once per epoch
        mean = lambda total: total / max(self.n_steps, 1)
        step = lambda bad: bad if bad >= 0 else None
        if self.members is None:
            return mean(loss_sums), out, step(bad_steps)
        return [mean(t) for t in loss_sums], out, [step(b) for b in bad_steps]


class GraphedTrainStep(TrainStep):
    """The same step, captured as one CUDA graph and replayed for every batch (CUDA only).

    The first ``warmup`` steps run eagerly on a side stream (cuDNN autotuning, lazy
    initialisation, torch.compile), as PyTorch's whole-network capture requires; they are real
    training steps. With torch.compile, the first of them compiles the forward pass, then at its
    backward the backward pass, and launches every generated kernel once (Triton's autotuning
    happens at a kernel's first launch; 'max-autotune' tunes while compiling): the capture
    runs compiled code only. With ``cuda_streams``, the warm-up steps use the very side streams
    that the capture forks to, and so set up their cuDNN and cuBLAS state. The next batch is
    captured into static input tensors and replayed; later batches are copied into them. Every
    buffer the step writes (weights, gradients, momentum, BatchNorm statistics, the loss
    temperature, the accumulators) keeps its address, so a replay is the eager step. The
    learning rate is a constant of the captured update, so a new one (the scheduler's
    milestones, a resumed run) is captured afresh. Batches must keep one shape (training drops
    the last incomplete batch). If the capture fails, one warning line is printed and training
    goes on eagerly.
    """

    def __init__(self, *args, warmup=3, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device.type != 'cuda':
            raise ValueError('GraphedTrainStep needs a CUDA device')
        self.warmup = warmup
        self.graph = None
        self.graph_lr = None
        self.eager_only = False  # set when a capture failed
        self.static_x = self.static_y = None
        self.captures = 0

    def _lrs(self):
        return tuple(float(group['lr']) for group in self.optimizer.param_groups)

    def __call__(self, x, y):
        if self.eager_only:
            return super().__call__(x, y)
        if self.graph is None or self.graph_lr != self._lrs():
            if self.warmup > 0:
                self.warmup -= 1
                return self._eager_on_side_stream(x, y)
            if not self._capture(x, y):
                return super().__call__(x, y)
        else:
            if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
                raise ValueError(f'a captured step takes batches of {tuple(self.static_x.shape)}, '
                                 f'got {tuple(x.shape)}')
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        self.graph.replay()
        self.n_steps += 1

    def _eager_on_side_stream(self, x, y):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            super().__call__(x, y)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self, x, y):
        """Capture the step on the batch (x, y), which the following replay then trains on.
        False, after one warning line, if the capture failed (eager from then on)."""
        self.graph = None  # frees the previous capture's memory pool
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated by the capture
        self.static_x = x.clone()  # same memory format
        self.static_y = y.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # host sync (once per capture)
                self._forward_backward_update(self.static_x, self.static_y)
        except Exception as e:  # noqa: BLE001 - any failure: the eager step is still correct
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            print(f'warning: CUDA graph capture of the training step failed ({type(e).__name__}: '
                  f'{first}); training goes on eagerly (set cuda_graph=False to skip the '
                  'attempt)', file=sys.stderr, flush=True)
            self.eager_only = True
            self.graph = self.static_x = self.static_y = None
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            return False
        self.graph, self.graph_lr = graph, self._lrs()
        self.captures += 1
        return True


def build_step(model, loss_fn, optimizer, n_exits, acc_tops, device, amp=False, T=None,
          cuda_graph=False, compile=None, cuda_streams=False, members=None):
    """The training step: a GraphedTrainStep when ``cuda_graph`` (on CUDA), else the eager
    TrainStep.

    ``compile``: a torch.compile mode for the model and the loss. Inside our graph,
    'max-autotune' compiles without torch.compile's own CUDA graphs
    ('max-autotune-no-cudagraphs'), as ours holds the whole step; 'reduce-overhead' is nothing
    but those graphs and so is refused there. ``cuda_streams``: the model's independent
    branches on parallel streams; not with ``compile``, whose generated code orders the kernels.
    ``members``: the K runs of a pack at once (``TrainStep``).
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
