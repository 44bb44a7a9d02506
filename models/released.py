"""The authors' released code (makrout/Deep-Learning-without-Weight-Transport at 688f47a, fcnn/FCNN_*.py and
run.sh) and their logs: the settings that --settings released of models.reproduce takes (RELEASED_*, each choice
named in RELEASED_CHOICES, bugs included where they change results), the net, optimizer, loader and loss their
code trains with (released_net, released_optimizer, released_loader, summed_bce), and the numbers their own
MNIST runs logged (AUTHORS_LOG, AUTHORS_EPOCHS, AUTHORS_SEED, AUTHORS_PROJECTIONS, AUTHORS_EPOCH_400,
AUTHORS_FA_ANGLE), against which models.reproduce tables its runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import circuits
from circuits import rules

from .mlp import mlp

HIDDEN = 500
BATCH = 128
AUTHORS_EPOCHS = 400
"""How long the authors trained on MNIST (their logs' last epoch)."""
AUTHORS_SEED = 1111
"""The seed of the authors' logged runs (main.py's default)."""
AUTHORS_PROJECTIONS = ("fc1", "fc2")
"""The layers whose angles AUTHORS_LOG and AUTHORS_EPOCH_400 give, in their order."""
AUTHORS_EPOCH_400 = {"bp": (98.50, None, None), "fa": (97.80, 89.85, 40.03), "kp": (98.45, 19.96, 3.62),
                     "wm": (98.49, 12.79, 3.79)}
"""The authors' own MNIST runs after their last (400th) epoch (experiments/mnist/<rule>-V0/log.txt, as
AUTHORS_LOG): test accuracy (%) and angle(B, W) of fc1 and fc2 in degrees, rounded to 2 decimals. Their
fc1 ends above the 10-degree bar under KP (19.96) and WM (12.79)."""
AUTHORS_FA_ANGLE = 40.0
"""The authors' last-layer angle(B, W) under FA on MNIST (about 40 degrees)."""

AUTHORS_LOG: dict[str, tuple[tuple[float, float | None, float | None], ...]] = {
    "bp": ((88.0, None, None), (89.69, None, None), (90.58, None, None), (91.28, None, None), (91.84, None, None),
           (92.39, None, None), (92.93, None, None), (93.38, None, None), (93.78, None, None), (94.12, None, None)),
    "fa": ((85.49, 89.83, 40.04), (88.04, 89.83, 34.92), (89.01, 89.82, 32.60), (89.51, 89.82, 31.30),
           (89.88, 89.81, 30.50), (90.15, 89.81, 29.99), (90.41, 89.81, 29.65), (90.57, 89.80, 29.44),
           (90.68, 89.80, 29.31), (90.86, 89.80, 29.25)),
    "kp": ((88.9, 70.95, 19.75), (90.65, 65.28, 17.09), (91.75, 61.15, 15.75), (92.57, 57.72, 14.74),
           (93.46, 54.87, 13.91), (94.08, 52.49, 13.20), (94.51, 50.47, 12.59), (94.81, 48.74, 12.06),
           (95.14, 47.24, 11.59), (95.41, 45.92, 11.18)),
    "wm": ((78.48, 83.16, 61.33), (84.23, 81.31, 53.15), (86.54, 79.88, 47.26), (87.94, 78.34, 41.99),
           (88.48, 77.18, 37.98), (89.15, 76.08, 34.86), (89.59, 75.12, 32.51), (89.93, 74.20, 31.22),
           (90.18, 73.26, 29.31), (90.49, 72.22, 27.45)),
}
"""The authors' own MNIST runs epoch by epoch, the first 10 of 400 (makrout/Deep-Learning-without-Weight-
Transport, experiments/mnist/<rule>-V0/log.txt): test accuracy (%) and angle(B, W) of fc1 and fc2 (their
"layer 3" and "layer 2") in degrees after each epoch, rounded to 2 decimals."""

RELEASED_LR = {"bp": 0.2, "fa": 0.2, "wm": 0.05, "kp": 0.3}
"""run.sh lines 3, 7, 11, 15: the learning rate per rule. SS and DFA, not in their code, get BP's."""
RELEASED_NOISE = 0.1
"""FCNN_WM.py line 48: mirror noise 0.1 * (U[0, 1) - 0.5), uniform on [-0.05, 0.05): std 0.1 / sqrt(12)."""
RELEASED_MIRROR_ETA = 0.01
"""FCNN_WM.py line 30: mirror_learning_rate."""
RELEASED_CHOICES = (
    "output: sigmoid units trained with binary cross-entropy summed over the 10 classes and averaged over the "
    "batch (FCNN_BP.py lines 73, 182: delta = y - target), not a softmax",
    "inputs: pixels in [0, 1] (main.py, preprocess), not centred",
    "init: W, b and B drawn from N(0, 1 / (n_in + n_out)) (FCNN_BP.py lines 29-32, FCNN_FA.py line 30)",
    "learning rate per rule: BP 0.2, FA 0.2, WM 0.05, KP 0.3 (run.sh); SS and DFA, absent from their code, BP's 0.2",
    "bug: the bias gradient is averaged over the batch (FCNN_BP.py line 185) and then divided by the batch size "
    "again (line 142): biases learn at lr / 128",
    "no shuffling: the same batches in file order every epoch, the last 60,000 - 468 x 128 = 96 images never "
    "used (FCNN_BP.py lines 103-106, 125)",
    "KP: no decay; the factor weight_decay defaults to 1 and is never set (FCNN_KP.py lines 30, 64, 72), so "
    "W - B never shrinks",
    "WM: noise uniform on [-0.05, 0.05) (FCNN_WM.py line 48; its docstring says Gaussian), response "
    "sigmoid(W y + b) (line 49), correlation summed over the 128 noise samples, eta_B 0.01, no decay (line 51)",
    "WM bug: the growth control rebinds a local name and so does nothing (FCNN_WM.py lines 53-58): B grows "
    "without bound",
    "float64 NumPy there, float32 torch here (--dtype float64 for theirs); initial draws and WM's noise from NumPy's "
    "generator there, torch's here (--init numpy for theirs: with seed 1111 their runs' weights and noise)",
)



def summed_bce(output: Tensor, target: Tensor) -> Tensor:
    """L = mean over the batch of sum_k -t_k log y_k - (1 - t_k) log(1 - y_k), t the one-hot target and
    y the sigmoid output (FCNN_BP.py line 73); its error at the output's summed input is y - t (line 182)."""
    onehot = F.one_hot(target, output.shape[1]).to(output.dtype)
    return F.binary_cross_entropy(output, onehot, reduction="sum") / output.shape[0]


class AuthorsNoise(nn.Module):
    """The weight mirror's noise as the authors' code draws it, from the NumPy generator that drew the initial
    weights (authors_init), continued: in each mirror batch, for each layer in order, x = 0.1 (U[0, 1) - 0.5) of
    shape (n_in, batch) (FCNN_WM.py line 48, our noise transposed); after the `warmup` first batches and after each
    later one, per layer U[0, 1) of shape (n_out, batch), drawn and discarded by their growth control (lines
    53-58, which change nothing but the generator's state). A module so that the generator's state and the
    batch count go with the net's state_dict into a checkpoint (get_extra_state)."""

    def __init__(self, generator: np.random.RandomState, layers: Sequence[tuple[int, int]], warmup: int) -> None:
        super().__init__()
        self.generator, self.layers, self.warmup = generator, [tuple(shape) for shape in layers], warmup
        self.drawn = 0                       # noise draws so far, one per layer per mirror batch

    def draw(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        batch, n_in = shape
        if n_in != self.layers[self.drawn % len(self.layers)][1]:
            raise ValueError(f"the authors' noise comes layer by layer, {self.layers} (n_out, n_in): got noise for "
                             f"{n_in} inputs where layer {self.drawn % len(self.layers)} was next")
        x = RELEASED_NOISE * (self.generator.rand(n_in, batch) - 0.5)
        self.drawn += 1
        if self.drawn % len(self.layers) == 0 and self.drawn // len(self.layers) >= self.warmup:
            for n_out, _ in self.layers:
                self.generator.rand(n_out, batch)
        return torch.from_numpy(x.T.copy()).to(device=like.device, dtype=like.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = state["drawn"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleasedWeightMirror(rules.WeightMirror):
    """rules.WeightMirror with its noise drawn by `noise_source` (AuthorsNoise), not torch's generator."""

    noise_source: AuthorsNoise = dataclasses.field(compare=False, repr=False)

    def mirror_noise(self, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.noise_source.draw(shape, like)


def released_rule(rule: str, noise_source: AuthorsNoise | None = None) -> rules.FeedbackRule:
    """KP without decay; WM as FCNN_WM.py's mirror (lines 48-51), its noise from `noise_source` if given (else
    torch's generator); any other rule as registered."""
    if rule == "kp":
        return rules.KolenPollack(decay=0.0)
    if rule == "wm":
        settings = dict(sigma=RELEASED_NOISE / math.sqrt(12), eta=RELEASED_MIRROR_ETA, decay=0.0, noise="uniform",
                        response="sigmoid", reduction="sum")
        if noise_source is None:
            return rules.WeightMirror(**settings)
        return ReleasedWeightMirror(**settings, noise_source=noise_source)
    return rules.get(rule)


INITS = ("torch", "numpy")
"""Where released_net draws the initial weights from: torch's generator, or NumPy's as the authors' code does."""


def released_net(rule: str, seed: int, inputs: int, classes: int = 10, *, init: str = "torch",
                 dtype: torch.dtype = torch.float32, train_size: int = 60_000) -> circuits.CircuitNet:
    """The authors' inputs-500-classes net with sigmoid output under `rule`, its floats `dtype`, drawn from `seed`
    as their code draws it: W, b and every stored B from N(0, 1 / (n_in + n_out)) (FCNN_BP.py lines 29-32,
    FCNN_FA.py line 30).

    init "torch": from torch's generator seeded with `seed` (float32 draws, widened to `dtype`), each layer's b
    and W first, so every rule of a seed starts from the same forward weights. init "numpy": from NumPy's legacy
    generator (authors_init), so that seed 1111 starts from the authors' own runs' weights; the weight mirror's
    noise then comes from the same generator, continued as their code draws it (AuthorsNoise, `net.authors_noise`;
    its warmup: the whole batches of `train_size` images, their code's first mirror)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; inits: {', '.join(INITS)}")
    drawn = np.random.RandomState(seed) if init == "numpy" else None       # the authors' generator
    source = None
    if drawn is not None and rule == "wm":
        source = AuthorsNoise(drawn, [(HIDDEN, inputs), (classes, HIDDEN)], warmup=train_size // BATCH)
    torch.manual_seed(seed)                     # direct feedback (DFA) draws its B at build
    net = mlp((inputs, HIDDEN, classes), rule=released_rule(rule, source), output_activation="sigmoid").build()
    synapses = [s for _, s in net.projections()]
    stored = [s for s in synapses if isinstance(getattr(s, "B", None), Tensor)]  # a B of its own (FA, KP, WM)
    if drawn is not None:
        if source is not None:
            net.authors_noise = source          # its generator's state goes into the net's state_dict
        net.to(dtype)
        authors_init(synapses, stored, drawn)
        return net
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in synapses:
            std = 1 / math.sqrt(sum(s.weight.shape))
            s.bias.normal_(0, std, generator=generator)
            s.weight.normal_(0, std, generator=generator)
        for s in stored:
            s.feedback = torch.randn(s.B.shape, generator=generator) / math.sqrt(sum(s.weight.shape))
    return net.to(dtype)


def authors_init(synapses: Sequence[circuits.Synapse], stored: Sequence[circuits.Synapse],
                 generator: np.random.RandomState) -> None:
    """b, W and B set as the authors' code draws them, in the synapses' dtype, from NumPy's legacy generator
    seeded with the seed (np.random.seed, main.py; here RandomState(seed)): every layer's b = s randn(n_out, 1),
    every layer's W = s randn(n_out, n_in) (FCNN_BP.py lines 29-32) and every stored B = s randn(n_in, n_out), our
    B transposed (FCNN_FA.py line 30, which FCNN_KP and FCNN_WM inherit), with s = sqrt(1 / (n_in + n_out)). A B
    shaped otherwise (LDFA's, from the output) is drawn in its own shape at the same scale."""

    def draw(synapse: circuits.Synapse, *shape: int) -> Tensor:
        scale = np.sqrt(1.0 / sum(synapse.weight.shape))
        return torch.from_numpy(scale * generator.randn(*shape)).to(synapse.weight.dtype)

    with torch.no_grad():
        for s in synapses:
            s.bias.copy_(draw(s, s.weight.shape[0], 1)[:, 0])
        for s in synapses:
            s.weight.copy_(draw(s, *s.weight.shape))
        for s in stored:
            s.feedback = draw(s, *s.B.shape[::-1]).T


def released_optimizer(net: circuits.CircuitNet, rule: str, batch_size: int = BATCH) -> torch.optim.SGD:
    """Plain SGD at the rule's learning rate (run.sh); biases at lr / batch_size, the bias bug
    (b -= lr / batch_size * mean of delta over the batch, FCNN_BP.py lines 142, 185)."""
    lr = RELEASED_LR.get(rule, RELEASED_LR["bp"])
    biases = [s.bias for _, s in net.projections()]
    ids = {id(b) for b in biases}
    return torch.optim.SGD([{"params": [p for p in net.parameters() if id(p) not in ids]},
                            {"params": biases, "lr": lr / batch_size}], lr=lr)


def released_loader(train: torch.utils.data.Dataset, batch_size: int = BATCH) -> DataLoader:
    """The training images in file order every epoch, the last incomplete batch dropped (FCNN_BP.py 103-106, 125).
    With a generator of its own, unused for the order: without one a DataLoader draws its base seed from torch's
    global generator at every pass, which would shift the weight mirror's noise (and make a seed's run differ
    from its copy in a circuits.SeedBatch, whose noise comes from the seed's own generator)."""
    return DataLoader(train, batch_size=batch_size, shuffle=False, drop_last=True, generator=torch.Generator())
