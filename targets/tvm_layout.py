"""NHWC activations between the int8 kernels that want them, so that transposes cancel
(issue 18, point 2).

The packed dot-product convs (tvm_dot) and the depthwise int8 conv compute in NHWC; the rest
of the imported graph is NCHW. Without help, every such conv is wrapped in two transposes
(NCHW -> NHWC before, back after), and on MobileNetV2 the transposes, fused into the pads and
requantizes between the convs, cost more than the convs (measured: 19 of 51 ms untuned).

`Twins` keeps, next to the NCHW value of an fx node, its NHWC twin where one exists: a
converter that computes in NHWC records its result there (and returns the NCHW transpose
for everything else), and a layout-free op (quantize, per-tensor dequantize, relu, hardtanh,
clamp, add of two twins) whose tensor inputs all have twins gets a twin too: the same
converter run on the twins. A conv that wants NHWC reads its input's twin instead of
transposing. The NCHW values nobody reads are removed by dead-code elimination (tvm_tune.fuse),
so a chain conv -> relu6 -> quantize -> conv keeps no transpose at all.

Why this is exact: those ops are elementwise with scalar (per-tensor) parameters, so they
commute with any permutation of the axes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

#: default converters (Relax's importer) of ops that commute with a layout change when their
#: non-tensor arguments are scalars
LAYOUT_FREE = ("relu.default", "relu_.default", "hardtanh.default", "hardtanh_.default",
               "clamp.default", "add.Tensor", "add_.Tensor")


@dataclass
class Twins:
    nhwc: dict[fx.Node, Any] = field(default_factory=dict)

    def to_nchw(self, node: fx.Node, bb: Any, y_nhwc: Any) -> Any:
        """Record `y_nhwc` as `node`'s twin; return its NCHW transpose (the node's value)."""
        from tvm import relax

        self.nhwc[node] = y_nhwc
        return bb.emit(relax.op.permute_dims(y_nhwc, [0, 3, 1, 2]))

    def follow(self, convert: Callable[[fx.Node, Any], Any],
               when: Callable[[fx.Node], bool] = lambda node: True
               ) -> Callable[[fx.Node, Any], Any]:
        """A converter that also computes the node's twin when every tensor input has one
        (and `when(node)`: e.g. a dequantize only when it is per-tensor)."""

        def converter(node: fx.Node, imp: Any) -> Any:
            out = convert(node, imp)
            args = [a for a in node.args if isinstance(a, fx.Node)]
            rank = len(node.meta["val"].shape) if "val" in node.meta else None
            if rank == 4 and args and all(a in self.nhwc for a in args) and when(node) \
                    and not any(
                    isinstance(v, fx.Node) for v in node.kwargs.values()):
                saved = {a: imp.env[a] for a in args}
                imp.env.update({a: self.nhwc[a] for a in args})
                try:
                    self.nhwc[node] = convert(node, imp)
                finally:
                    imp.env.update(saved)
            return out

        return converter

    def defaults(self) -> dict[str, Callable[[fx.Node, Any], Any]]:
        """`follow` wrappers of the importer's own converters for LAYOUT_FREE ops."""
        found: dict[str, Any] = {}

        def default(name: str) -> Callable[[fx.Node, Any], Any]:
            def convert(node: fx.Node, imp: Any) -> Any:
                if name not in found:  # the importer's map, before custom entries replace it
                    found[name] = imp.create_convert_map()[name]
                return found[name](node)

            return self.follow(convert)

        return {name: default(name) for name in LAYOUT_FREE}
