"""Which models circuits.from_torch converts exactly: every torchvision classification model and a named sample of
timm models across families, each at a small valid input, float64 with true float64 weights.

For each model: the forward equals torch's, bp's input and parameter gradients equal autograd's (parameters matched
by name), one training step under fa, kp, wm and dfa leaves finite weights that moved, and one mirror batch moves
every B of the wm net. A model from_torch refuses is tried in place (circuits.in_place: forward equal, one fa step).
Each row is exact / refused (the reason) / in-place fallback / skipped (the reason: --max-params, --max-memory);
the table is printed and, with --write, merged into docs/conversion.md's zoo table (each model's row replaced or
added, the others kept).

    python benchmarks/zoo.py --write                      # everything (hours on 2 CPU cores)
    python benchmarks/zoo.py --source timm --max-params 30
    python benchmarks/zoo.py --only resnet18 convnext_atto
    python benchmarks/zoo.py --source torchvision --max-memory 18 --write
    python benchmarks/zoo.py --rows-from big.log --write    # rows printed by earlier runs, merged into the table
"""
from __future__ import annotations

import argparse
import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import circuits
from circuits.phases.mirror import mirror_step

TIMM = ["resnet18", "resnet26d", "resnet50d", "seresnext26d_32x4d", "resnetv2_50", "res2net50_14w_8s",
        "convnext_atto", "convnext_nano", "convnextv2_atto", "efficientnet_b0", "efficientnetv2_rw_t",
        "tf_efficientnet_lite0", "mobilenetv3_small_100", "mobilenetv4_conv_small", "mnasnet_100", "ghostnet_100",
        "regnetx_002", "regnety_004", "rexnet_100", "dla34", "dpn68", "densenet121", "vgg11", "hrnet_w18_small",
        "cspdarknet53", "darknet53", "dm_nfnet_f0", "nf_resnet26", "repvgg_a0", "tinynet_e", "fbnetc_100",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch32_224",
        "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
        "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "poolformer_s12", "poolformerv2_s12",
        "convformer_s18", "mobilevit_xxs", "mobilevitv2_050", "swin_tiny_patch4_window7_224",
        "swinv2_cr_tiny_224", "levit_128s", "coat_lite_tiny", "pit_ti_224", "tnt_s_patch16_224",
        "twins_svt_small", "crossvit_tiny_240", "efficientformer_l1", "edgenext_xx_small", "maxvit_tiny_tf_224",
        "coatnet_0_rw_224", "fastvit_t8", "repghostnet_050", "inception_v3", "xception41"]
"""The timm sample: ResNet(-D), SE-ResNeXt, ResNetV2, Res2Net, ConvNeXt(V2), EfficientNet(V2), MobileNet, MNASNet,
GhostNet, RegNet, ReXNet, DLA, DPN, DenseNet, VGG, HRNet, CSP/DarkNet, NFNet, RepVGG, ViT, DeiT, BEiT, EVA, CaiT,
XCiT, Mixer, ResMLP, gMLP, PoolFormer, MetaFormer, MobileViT, Swin, LeViT, CoaT, PiT, TNT, Twins, CrossViT,
EfficientFormer, EdgeNeXt, MaxViT, CoAtNet, FastViT, RepGhost, Inception, Xception."""
RULES = ("fa", "kp", "wm", "dfa")
SIZES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, "swin": 64, "crossvit": 240, "levit": 224, "tnt": 224,
         "twins": 224, "maxvit_tiny_tf_224": 224, "coatnet": 224, "efficientformer": 224, "fastvit": 64, "coat": 224,
         "pit": 224, "xcit": 224, "beit": 224, "eva02": 224, "vit": 32, "vit_h_14": 28, "deit": 32, "cait": 32,
         "mixer": 32, "resmlp": 32, "gmlp": 32, "mobilevit": 64, "hrnet": 64, "dm_nfnet": 64, "nf_": 64,
         "googlenet": 32, "edgenext": 64, "xception": 71}
"""Input sizes (square) that the model takes, by name prefix; models whose size is an argument are built at it."""
DEFAULT_SIZE = 32
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "conversion.md"


@dataclass
class Row:
    source: str
    name: str
    params: int = 0
    size: int = 0
    status: str = ""
    detail: str = ""
    seconds: float = 0.0


def parameters(make: Callable[[], nn.Module]) -> int:
    """The model's parameter count, built on the meta device (no memory) where its builder allows."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in make().parameters())
    except NotImplementedError:      # a builder that computes with tensors (torchvision's RegNet widths)
        return sum(p.numel() for p in make().parameters())


def size_of(name: str) -> int:
    return next((size for prefix, size in sorted(SIZES.items(), key=lambda kv: -len(kv[0]))
                 if name.startswith(prefix)), DEFAULT_SIZE)


def builder(source: str, name: str, size: int) -> Callable[[], nn.Module]:
    """A function that builds the model with 10 classes at input `size` (img_size / image_size where it takes one)."""
    if source == "torchvision":
        import torchvision
        fn = torchvision.models.get_model_builder(name)
        extra = {"image_size": size} if name.startswith("vit_") else {}
        extra |= {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        return lambda: in_default_dtype(fn(num_classes=10, **extra))
    import timm

    def make() -> nn.Module:
        try:
            return in_default_dtype(timm.create_model(name, num_classes=10, img_size=size))
        except TypeError:
            return in_default_dtype(timm.create_model(name, num_classes=10))
    return make


def in_default_dtype(module: nn.Module) -> nn.Module:
    """The module with its floating buffers in the default dtype, as its parameters are: a buffer a builder makes
    in float32 whatever the default (torchvision Swin-V2's relative_coords_table) would meet float64 weights, and
    torch's own forward would fail. A cast constant, the same in torch's module and the circuit."""
    return module.to(torch.get_default_dtype())


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Models built in float64 (their init drawn in it: true float64 weights, not float32 values cast)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def _relative(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(floor))


def check(row: Row, make: Callable[[], nn.Module]) -> None:
    """Fill `row`: exact (forward and bp gradients), the rules' steps and a mirror batch; or why it is refused."""
    torch.manual_seed(0)
    module = make().eval()
    row.params = sum(p.numel() for p in module.parameters())
    shape = (3, row.size, row.size)
    x = torch.randn(2, *shape)
    try:
        net = circuits.from_torch(module, input_shape=shape).build()
    except circuits.CircuitError as e:
        row.detail = str(e)
        in_place(row, module, x)
        return
    forward, gradients = compare(module, net, x)
    del net                                   # its W, B and gradients, and torch's gradients: the rules' nets fit
    module.zero_grad(set_to_none=True)
    steps = [step(circuits.from_torch(module, rule=rule, input_shape=shape).build(), x, rule) for rule in RULES]
    exact = forward <= 1e-12 and gradients <= 1e-9
    row.status = "exact" if exact and all(steps) else "differs"
    row.detail = f"forward {forward:.0e}, bp gradients {gradients:.0e}; " + ", ".join(
        f"{rule} {'ok' if ok else 'FAILED'}" for rule, ok in zip(RULES, steps, strict=True))


def compare(module: nn.Module, net: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Relative differences of the output and of the largest bp gradient (input and parameters, by name). A
    gradient that is zero in exact arithmetic (a bias before a softmax over its axis: torch's is 1e-28) is compared
    at 1e-12 of the largest gradient's norm."""
    x_net, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = net(x_net), module(x_ref)
    weights = torch.randn_like(ref)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    grads = {k.replace(".", "_").lower(): p.grad for k, p in net.named_parameters()}   # fx's node names: lower case
    worst = _relative(x_net.grad, x_ref.grad)
    floor = 1e-12 * max(float(p.grad.norm()) for p in module.parameters() if p.grad is not None)
    for name, p in module.named_parameters():      # fc.weight is proj.fc.weight, an operation's proj.*.held_fc_weight
        flat = name.replace(".", "_").lower()
        mine = [g for k, g in grads.items() if k == f"proj_{flat}" or k.endswith(f"_held_{flat}")]
        if p.grad is None:
            continue
        worst = max(worst, _relative(mine[0], p.grad, floor) if len(mine) == 1 and mine[0] is not None
                    else float("inf"))
    return _relative(out, ref), worst


def step(net: nn.Module, x: torch.Tensor, rule: str) -> bool:
    """One SGD step in train mode on random labels: a finite loss, a non-zero step of some W, finite weights after
    it; under wm also one mirror batch that changes every B (told by two sums of each B, before and after: no copy of
    the weights, so that the largest models fit)."""
    net.train()
    loss = F.cross_entropy(net(x), torch.tensor([1, 7]))
    loss.backward()
    moved = any(p.grad is not None and bool(p.grad.ne(0).any()) for k, p in net.named_parameters()
                if k.endswith("weight"))
    torch.optim.SGD(net.parameters(), lr=0.01).step()
    ok = bool(torch.isfinite(loss)) and moved and all(torch.isfinite(p).all() for p in net.parameters())
    if rule == "wm":
        feedback = {n: _sums(s.feedback) for n, s in net.projections() if s.rule is not None}
        mirror_step(net, batch_size=4)
        ok = ok and all(_sums(s.feedback) != feedback[n] and torch.isfinite(s.feedback).all()
                        for n, s in net.projections() if n in feedback)
    return ok


def _sums(t: torch.Tensor) -> tuple[float, float]:
    """A weight's sum and its sum weighted by position: both stay only if it did not change, or changed by chance
    in a way that keeps both."""
    flat = t.detach().flatten()
    return float(flat.sum()), float(flat @ torch.arange(1, len(flat) + 1, dtype=flat.dtype))


def in_place(row: Row, module: nn.Module, x: torch.Tensor) -> None:
    """The fallback for a refused model: converted in place, forward equal to torch's, one fa step."""
    reason = row.detail
    try:
        ref = module(x)
        net = circuits.in_place(module, x, "fa")
        forward = _relative(net(x), ref)
        ok = step(net, x, "fa")
    except Exception as e:  # noqa: BLE001 - the row records any failure
        row.status, row.detail = "refused", f"{_short(reason)} (in place: {_short(str(e))})"
        return
    row.status = "in place" if forward <= 1e-12 and ok else "refused"
    row.detail = f"{_short(reason)} (in place: forward {forward:.0e}, fa {'ok' if ok else 'FAILED'})"


def _short(text: str) -> str:
    text = re.sub(r" \(%.*?kwargs = \{.*?\}\)\)", "", text.split("\n")[0])     # fx's node text
    return text[:220] + ("..." if len(text) > 220 else "")


STATUSES = ("exact", "in place", "refused", "differs", "error", "skipped")
COLUMNS = ("source", "model", "parameters", "input", "result", "detail")


def table(rows: list[Row], seconds: bool = True) -> str:
    """The rows as a markdown table under their counts; with `seconds`, each row's time."""
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    columns = COLUMNS + (("seconds",) if seconds else ())
    lines = [" / ".join(f"{n} {s}" for s, n in counts.items() if n), "",
             f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    lines += [f"| {r.source} | {r.name} | {r.params / 1e6:.1f}M | {r.size} | {r.status} | "
              f"{r.detail.replace('|', '/')} |" + (f" {r.seconds:.0f} |" if seconds else "") for r in rows]
    return "\n".join(lines)


START, END = "<!-- zoo table -->", "<!-- end zoo table -->"


def written() -> list[Row]:
    """The rows of docs/conversion.md's zoo table."""
    _, _, rest = GUIDE.read_text().partition(START)
    return rows_of(rest.partition(END)[0])


def rows_of(text: str) -> list[Row]:
    """The rows of the zoo tables in `text` (this script's printed output, or the written table), in order."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) >= len(COLUMNS) and cells[0] in ("torchvision", "timm"):
            source, name, params, size, status, detail = cells[:len(COLUMNS)]
            rows.append(Row(source, name, round(float(params.removesuffix("M")) * 1e6), int(size), status, detail))
    return rows


def write(rows: list[Row]) -> None:
    """The rows into docs/conversion.md's zoo table, between its markers: each replaces the table's row of the same
    source and model (a skipped one only another skipped one: a measurement stays until measured again), the table's
    other rows stay (a run of --only updates its models), in the order of models()."""
    order = {key: i for i, key in enumerate(models("all", None))}
    merged = {(r.source, r.name): r for r in written()}
    merged |= {(r.source, r.name): r for r in rows
               if r.status != "skipped" or merged.get((r.source, r.name), r).status == "skipped"}
    text = table(sorted(merged.values(), key=lambda r: order.get((r.source, r.name), len(order))), seconds=False)
    before, _, rest = GUIDE.read_text().partition(START)
    GUIDE.write_text(f"{before}{START}\n{text}\n{END}{rest.partition(END)[2]}")


def memory(params: int) -> float:
    """About how many GB a float64 check of a model with `params` parameters needs at its peak: 75 bytes a parameter
    (torch's module, the circuit's copy of its weights, a net's W and B and their gradients, a rule's temporaries),
    and 1 GB for torch itself; measured 5.4 GB on swin_v2_b (86.9M), 6.9 GB on vit_b_32 (87.4M), 14.6 GB on
    convnext_large (196.2M)."""
    return params * 75 / 1e9 + 1


def models(source: str, only: list[str] | None) -> list[tuple[str, str]]:
    found = []
    if source in ("all", "torchvision"):
        import torchvision
        found += [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if source in ("all", "timm"):
        found += [("timm", n) for n in TIMM]
    return [(s, n) for s, n in found if not only or n in only]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=["all", "torchvision", "timm"], default="all")
    p.add_argument("--only", nargs="*", help="model names to check (default: all of the source)")
    p.add_argument("--max-params", type=float, default=float("inf"), help="skip models above this many millions")
    p.add_argument("--max-memory", type=float, default=float("inf"),
                   help="skip models whose float64 check needs more than this many GB (memory())")
    p.add_argument("--write", action="store_true", help="write the table into docs/conversion.md")
    p.add_argument("--rows-from", nargs="*", metavar="LOG",
                   help="instead of checking models, read the rows of this script's printed tables in these files "
                        "(runs of one model each: a later row of a model replaces an earlier one)")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.rows_from:
        rows = list({(r.source, r.name): r for log in args.rows_from for r in rows_of(Path(log).read_text())}.values())
        print(table(rows, seconds=False))
        if args.write:
            write(rows)
        return
    rows = []
    for source, name in models(args.source, args.only):
        row = Row(source, name, size=size_of(name))
        start = time.time()
        with float64():
            make = builder(source, name, row.size)
            row.params = parameters(make)
            if row.params > args.max_params * 1e6:
                row.status, row.detail = "skipped", f"over --max-params {args.max_params:g}M"
            elif memory(row.params) > args.max_memory:
                row.status, row.detail = "skipped", (
                    f"its float64 check needs about {memory(row.params):.0f} GB (75 bytes a parameter), over "
                    f"--max-memory {args.max_memory:g} GB")
            else:
                try:
                    check(row, make)
                except Exception as e:  # noqa: BLE001 - the row records any failure
                    row.status, row.detail = "error", _short(f"{type(e).__name__}: {e}")
        row.seconds = time.time() - start
        print(f"{source:12s} {name:34s} {row.params / 1e6:7.1f}M {row.status:9s} {row.detail}", flush=True)
        rows.append(row)
    print(table(rows))
    if args.write:
        write(rows)


if __name__ == "__main__":
    main()
