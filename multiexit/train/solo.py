"""A run trained alone (``Solo``): what ``train.loop.fit`` drives, as it drives a fused pack of
runs (``train.pack.PackedRuns``), and the steps both build (``build_steps``)."""
from ..accel import distributed
from ..evaluate.passes import GraphedForward, evaluate
from .loop import train_epoch
from .rng import rng_state
from .step import build_step


class Solo:
    """One run, trained alone. Under torchrun its model is wrapped in DDP for the training step
    (gradients averaged over the ranks), and stays the plain module in ``run.model`` to be
    evaluated, saved and restored (converted to cross-rank BatchNorm with ``sync_bn``). A
    regime's new phase trains other parameters (``train.regime``): the steps are built again
    (``phase_changed``)."""

    def __init__(self, run):
        self.runs, self.run = [run], run
        if run.world_size > 1:
            run.model = distributed.convert_batchnorm(run.model, run.cfg.sync_bn)
        self.model, self.loss_fn = run.model, run.loss_fn
        self.T = getattr(run.loss_fn, 'temperature', None)
        self.train_loader, self.val_loader = run.train_loader, run.val_loader
        self._build_steps()

    def _build_steps(self):
        run = self.run
        self.trains = trainable(run.model)
        trained = distributed.ddp(run.model, run.device) if run.world_size > 1 else run.model
        self.step, self.eval_forward = build_steps(run, trained, run.train_loss, run.optimizer)

    def lr(self):
        return self.run.optimizer.param_groups[0]['lr']

    def train_epoch(self, progress=None):
        """([mean loss], [metrics], [first non-finite step or None]) of an epoch."""
        return train_epoch(self.step, self.train_loader, progress)

    def next_epoch(self, active):
        self.run.scheduler.step()
        if phase_changed(self.model, self.trains):
            self._build_steps()

    def validate(self, progress=None):
        """[validation metrics], with rank 0's BatchNorm statistics (those that are saved)."""
        distributed.broadcast_buffers(self.model)
        return evaluate(self.model, self.val_loader, self.run.n_exits, self.run.acc_tops,
                        self.T, progress, amp=self.run.amp, forward=self.eval_forward, members=1)

    def scatter(self):
        """Nothing: the run's own model, optimizer and loss trained."""

    def rng_states(self):
        """[(the RNG states to save, every rank's under DDP)]."""
        state = rng_state()
        return [(state, distributed.gathered(state) if self.run.world_size > 1 else None)]


def trainable(model):
    """Which of ``model``'s parameters train (a regime's phase freezes some)."""
    return tuple(p.requires_grad for p in model.parameters())


def phase_changed(model, trains):
    """Whether ``model`` trains other parameters than ``trains`` (``trainable`` when its steps
    were built): a regime's new phase, for which the steps are built again, since the
    parameters that train are a constant of both a captured CUDA graph (which gradients it
    computes, which parameters its update writes) and DDP's reducer. Once per epoch: the
    step itself reads no flag per batch. A new step warms up eagerly, which also creates the
    optimizer state that the phase dropped, before it is captured."""
    return trainable(model) != trains


def build_steps(lead, model, loss_fn, optimizer, members=1):
    """(training step, evaluation forward) of ``model`` with the switches of ``lead`` (a Run):
    the step replayed as one CUDA graph where it can be, and the evaluation forward too (None:
    eager)."""
    # Training batches have a fixed size (the last one is dropped), so one captured graph
    # (ours, or torch.compile's with 'reduce-overhead') serves every step of an epoch.
    # DDP's gradient all-reduce is not captured: several processes train eagerly.
    graphed = lead.cuda_graph and lead.world_size == 1 and lead.compile != 'reduce-overhead'
    if lead.cuda_graph and not graphed:
        lead.log('cuda_graph: not used ' + ('under torchrun (DDP)' if lead.world_size > 1 else
                                           "with compile='reduce-overhead' (its own graphs)"))
    step = build_step(model, loss_fn, optimizer, lead.n_exits, lead.acc_tops, lead.device,
                      amp=lead.amp, T=getattr(loss_fn, 'temperature', None), cuda_graph=graphed,
                      compile=lead.compile, cuda_streams=lead.cuda_streams, members=members)
    forward = (GraphedForward(model, amp=lead.amp, cuda_streams=lead.cuda_streams) if graphed
               else None)
    return step, forward
