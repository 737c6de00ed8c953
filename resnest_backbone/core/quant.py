"""int8 inference for the ResNeSt trunk: PyTorch's own post-training static quantization, torch.ao FX graph
mode with the x86 backend (fbgemm / oneDNN int8 kernels; VNNI where the CPU has it). CPU only.

    from resnest_backbone.core.quant import quantize_int8
    q = quantize_int8(trunk, calibration=[images1, images2])           # a trunk: its int8 GraphModule
    q = quantize_int8(d2_model, calibration=[batched_inputs1, ...])    # any model: its ResNeSt trunk(s) in int8

Every ResNeSt trunk in the model (the model itself, detectron2's `backbone.bottom_up`, mmdet/mmseg's
`backbone`) is symbolically traced, observed while the whole model runs on the calibration inputs (each
item is run as `model(item)`, or as `forward(model, item)`), and converted: convolutions (with their folded
BatchNorm and ReLU) and the attention's 1x1 convolutions run in int8 with per-channel weight scales (every
BatchNorm kind, frozen or synchronised, is folded first), and so does the split attention's full-size work
(Int8SplitAttention: pooling, split weighting and sum); only the attention weights (a softmax or sigmoid over
batch x radix x channels values) are computed in fp32. The trunk's outputs are fp32 again (dequantized), so
necks and heads are untouched and stay fp32. The caller's model is not modified (a copy is quantized) unless
inplace=True.

Error against fp32 is stated by tests/test_int8.py (relative error per stage on a trunk with calibrated
statistics; a detectron2 Faster R-CNN's FPN levels and detections), speed by the benchmark
(benchmarks/, "int8 quantize_int8"). Not for training, TorchScript or ONNX export of the quantized graph.
"""
import copy
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .split_attention import SplitAttentionConv2d, rsoftmax
from .trunk import ResNeSt

__all__ = ["Int8SplitAttention", "fx_int8", "int8_form", "quantize_int8", "resnest_trunks"]


def fx_int8(module: nn.Module, example: tuple, backend: str = "x86"):
    """`module` prepared for post-training static int8 (torch.ao prepare_fx with the backend's default
    qconfig mapping), and a function that converts it once calibrated: (prepared, convert). Run the prepared
    module on representative inputs (its observers record the ranges), then call convert(prepared). Raises
    what FX tracing raises for a module that is not symbolically traceable."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if backend not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"int8: the quantized engine {backend!r} is not in this torch build "
                           f"(supported: {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = backend
    prepared = prepare_fx(module.eval(), get_default_qconfig_mapping(backend), example)
    return prepared, convert_fx


def resnest_trunks(model: nn.Module) -> List[Tuple[str, ResNeSt]]:
    """(qualified name, module) of each outermost ResNeSt trunk in `model` ("" if the model is one)."""
    found: List[Tuple[str, ResNeSt]] = []
    for name, module in model.named_modules():
        if isinstance(module, ResNeSt) and not any(name.startswith(f"{outer}.") or outer == ""
                                                   for outer, _ in found):
            found.append((name, module))
    return found


def _plain_batch_norms(trunk: nn.Module) -> None:
    """Every inference-time per-channel affine norm of `trunk` that is not a plain nn.BatchNorm2d (SyncBN,
    detectron2's NaiveSyncBatchNorm and FrozenBatchNorm2d, ours) becomes an nn.BatchNorm2d computing the same
    map (weight = scale, bias = shift, mean 0, variance 1, eps 0; fuse.norm_scale_shift), in place: FX traces
    nn.BatchNorm2d as a leaf and folds it into the preceding convolution, where the other classes' forwards
    branch on tensor attributes or are traced into unfolded arithmetic. GroupNorm stays as it is."""
    from .fuse import norm_scale_shift

    for name, module in list(trunk.named_modules()):
        if type(module) is nn.BatchNorm2d or not name:
            continue
        stats = norm_scale_shift(module)
        if stats is None:
            continue
        scale, shift = stats
        plain = nn.BatchNorm2d(scale.numel(), eps=0.0).eval()
        with torch.no_grad():
            plain.weight.copy_(scale)
            plain.bias.copy_(shift)
        _set(trunk, name, plain)


class Int8SplitAttention(nn.Module):
    """A SplitAttentionConv2d's inference forward (same submodules, same weights) written with the operators
    that torch.ao's x86 mapping runs on quantized tensors, so that FX quantizes the block end to end: conv +
    bn0 + ReLU is one int8 convolution; the context pools every split (int8 average pool, at the conv's
    scale) and adds the pooled splits; fc1 + bn1 + ReLU and fc2 are int8 convolutions; the split weights
    (rsoftmax, or the sigmoid gate for radix 1) are fp32 on batch x radix x channels values; each split (a
    torch.narrow view of the int8 conv output) is multiplied by its weights and the products added, in int8.
    No full-size tensor is dequantized. In fp32 it equals the block's eval forward up to rounding (the
    context is pooled before the split sum: linear, per channel). Eval only; not deformable."""

    def __init__(self, block: SplitAttentionConv2d):
        super().__init__()
        if block.deformable:
            raise ValueError("Int8SplitAttention: a deformable split attention has no int8 form")
        self.radix, self.cardinality, self.channels = block.radix, block.cardinality, block.channels
        self.conv, self.bn0, self.fc1, self.bn1, self.fc2 = block.conv, block.bn0, block.fc1, block.bn1, block.fc2
        self.relu0, self.relu1 = nn.ReLU(), nn.ReLU()  # one per fusion pattern (conv-bn-relu, fc1-bn1-relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.bn0(self.conv(x)))
        pooled = nn.functional.adaptive_avg_pool2d(x, 1)
        gap = self._split(pooled, 0)
        for r in range(1, self.radix):
            gap = gap + self._split(pooled, r)
        attention = self.fc2(self.relu1(self.bn1(self.fc1(gap))))
        if self.radix == 1:
            return x * torch.sigmoid(attention)
        weights = rsoftmax(attention, self.radix, self.cardinality)  # (B, radix, C, 1, 1)
        out = self._split(x, 0) * weights[:, 0]
        for r in range(1, self.radix):
            out = out + self._split(x, r) * weights[:, r]
        return out

    def _split(self, x: torch.Tensor, r: int) -> torch.Tensor:
        # torch.narrow (not indexing): the x86 mapping keeps it on the quantized tensor, a view
        return torch.narrow(x, 1, r * self.channels, self.channels)


def int8_form(trunk: nn.Module) -> torch.fx.GraphModule:
    """`trunk` (eval) as the graph that FX int8 quantization prepares: every non-deformable
    SplitAttentionConv2d swapped for its Int8SplitAttention (in place), symbolically traced, and the
    nn.Identity calls (DropBlock at probability 0) removed from the graph, so that each convolution, its
    folded norm and its ReLU match the backend's fusion pattern (an Identity between norm and ReLU leaves the
    ReLU unfused). Same outputs as `trunk`."""
    for name, module in list(trunk.named_modules()):
        if type(module) is SplitAttentionConv2d and not module.deformable:
            _set(trunk, name, Int8SplitAttention(module))
    graph = torch.fx.symbolic_trace(trunk.eval())
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and type(graph.get_submodule(node.target)) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_int8(model: nn.Module, calibration: Iterable, backend: str = "x86", inplace: bool = False,
                  forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> nn.Module:
    """`model` with every ResNeSt trunk in post-training static int8 (see the module docstring), calibrated
    by running the model on each item of `calibration` (at least one; use a few real inputs of the deployment
    size: the activation ranges come from them): `forward(model, item)`, by default `model(item)` (a trunk:
    image tensors; detectron2: lists of input dicts). mmdet / mmseg: `forward=lambda m, data: m.test_step(data)`
    with batches as their data loaders give them. A model that is itself a trunk comes back as its quantized
    torch.fx GraphModule (same outputs: a dict of fp32 feature maps)."""
    trunks = resnest_trunks(model)
    if not trunks:
        raise ValueError(f"quantize_int8: no ResNeSt trunk in {type(model).__name__}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"quantize_int8: int8 ({backend}) runs on CPU; the model is on {sorted(devices)}")
    inputs = list(calibration)
    if not inputs:
        raise ValueError("quantize_int8: calibration is empty; give at least one input for model(input)")
    run = forward or (lambda m, item: m(item))
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    trunks = resnest_trunks(model)
    if trunks[0][0] == "" and forward is None:  # the model is a trunk called on the item itself
        examples = {"": (inputs[0],)}
    else:  # the trunks' inputs as the model produces them: recorded on the first calibration call
        examples = {}
        handles = [module.register_forward_pre_hook(lambda m, args, name=name: examples.setdefault(name, args))
                   for name, module in trunks]
        try:
            with torch.no_grad():
                run(model, inputs[0])
        finally:
            for h in handles:
                h.remove()
        unused = [name for name, _ in trunks if name not in examples]
        if unused:
            raise ValueError(f"quantize_int8: the ResNeSt trunk(s) {unused} did not run on the calibration input")
    prepared = {}
    for name, module in trunks:
        _plain_batch_norms(module)
        prepared[name], convert = fx_int8(int8_form(module), examples[name], backend)
        if name == "":
            model = prepared[name]
        else:
            _set(model, name, prepared[name])
    with torch.no_grad():
        for item in inputs:
            run(model, item)
    for name, module in prepared.items():
        converted = convert(module)
        if name == "":
            return converted
        _set(model, name, converted)
    return model
