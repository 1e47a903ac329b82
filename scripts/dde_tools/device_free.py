"""The constants in a TorchScript module that pin a device or a dtype, found in every method of
every submodule (export_models refuses the device ones; tests/python/test_export_device_free.py).

torch.jit.trace records the device of each factory call it sees as a `Device` constant:
`torch.arange(n)`, `torch.ones(x.shape)`, `torch.zeros(..., device="cpu")` and
`torch.arange(n, device=x.device)` all become `prim::Constant[value="cpu"]()`, while
`torch.zeros_like(x)` and `x.new_zeros(...)` record no device. A plain tensor attribute (not a
buffer) becomes a tensor constant. The C++ loader (src/models/torchscript.cpp) moves neither:
  - a Device constant stays "cpu" however the archive is loaded;
  - a tensor constant is stored in the archive's constants.pkl: torch.jit.load(path, map_location)
    moves it (the loader's fp32 path), but moving a module after loading it moves only its
    parameters and buffers (the bf16 path: load on the CPU, cast, then Module::to(device)).
    Found with a traced `x * w + self.offsets`, `offsets` a plain attribute (torch 2.11.0):
    loaded with map_location="meta" it ran on meta; loaded on the CPU with `w` then moved to
    meta, its forward failed on the CPU constant.
Both pass the export's CPU parity check and fail at the first GPU step. Tensors without
dimensions are left out: ops take a CPU scalar tensor beside tensors on any device.

A constant dtype fed to `aten::to` is the traced dtype: under bf16 autocast it casts back to fp32
where eager code would not. It is found (kind "dtype_to") but not a device constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

DEVICE_KINDS = ("device", "tensor")  # the kinds that cannot follow the module to another device


@dataclass(frozen=True)
class FixedConstant:
    """One constant: its kind ("device", "tensor" or "dtype_to"), where it is, and what uses it."""

    kind: str
    module: str  # the submodule's path in the archive, "" for the top module
    method: str
    node: str  # as TorchScript prints it; a tensor as its type and shape, not its values
    used_by: str  # the nodes that take it, each with the Python line the tracer recorded it at;
    # for "dtype_to" the line of the cast itself

    def describe(self) -> str:
        where = f"module '{self.module}'" if self.module else "the top module"
        return f"{where}, method {self.method}: {self.node}, " + (
            f"traced at {self.used_by}" if self.kind == "dtype_to" else f"used by {self.used_by}")


def method_graphs(module: torch.jit.ScriptModule, prefix: str = "") -> Iterator[tuple[str, str, torch._C.Graph]]:
    """(submodule path, method name, graph) of every method of `module` and of all its submodules."""
    for name in module._c._method_names():
        yield prefix.rstrip("."), name, module._c._get_method(name).graph
    for child_name, child in module.named_children():
        yield from method_graphs(child, f"{prefix}{child_name}.")


def _nodes(block: torch._C.Block | torch._C.Graph) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)


def _node_text(node: torch._C.Node) -> str:
    """The node without its trailing source comment."""
    return str(node).split(" # ", 1)[0].strip()


def _traced_at(node: torch._C.Node) -> str:
    """The innermost Python frame the tracer recorded for `node` ("file(line): function"), if any."""
    return node.sourceRange().split("\n", 1)[0].strip()


def _users(node: torch._C.Node) -> str:
    users = []
    for use in node.output().uses():
        at = _traced_at(use.user)
        users.append(f"{use.user.kind()}" + (f" at {at}" if at else ""))
    return "; ".join(dict.fromkeys(users)) or "nothing"


def _tensor_text(node: torch._C.Node, tensor: torch.Tensor) -> str:
    return (f"%{node.output().debugName()} : Tensor = prim::Constant "
            f"(a {str(tensor.dtype).removeprefix('torch.')} tensor of shape {list(tensor.shape)} on {tensor.device})")


def fixed_constants(module: torch.jit.ScriptModule) -> list[FixedConstant]:
    """Every Device constant, tensor constant with dimensions and constant dtype fed to `aten::to`
    (and every Device read from a module attribute: scripted code can keep one there)."""
    found = []
    for path, method, graph in method_graphs(module):
        for node in _nodes(graph):
            kind, text = None, _node_text(node)
            if node.kind() in ("prim::Constant", "prim::GetAttr"):
                type_kind = node.output().type().kind()
                if type_kind == "DeviceObjType":
                    kind = "device"
                elif node.kind() == "prim::Constant" and type_kind == "TensorType":
                    tensor = node.output().toIValue()
                    if tensor.dim() > 0:
                        kind, text = "tensor", _tensor_text(node, tensor)
            elif node.kind() == "aten::to":
                schema = torch._C.parse_schema(node.schema())
                if any(arg.name == "dtype" and value.node().kind() == "prim::Constant" and value.toIValue() is not None
                       for arg, value in zip(schema.arguments, node.inputs())):
                    kind = "dtype_to"
            if kind is not None:
                used_by = _traced_at(node) if kind == "dtype_to" else _users(node)
                found.append(FixedConstant(kind, path, method, text, used_by or "?"))
    return found


def device_constants(module: torch.jit.ScriptModule) -> list[FixedConstant]:
    """The constants of `module` that stay on the device it was traced on (DEVICE_KINDS)."""
    return [c for c in fixed_constants(module) if c.kind in DEVICE_KINDS]
