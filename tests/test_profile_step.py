"""benchmarks/profile_step.py's bookkeeping: op classes from op_names, time shares of overlapping ops.

The traced timings themselves are machine-dependent and never asserted; these are the pure parts that
turn a trace into the per-class table of BENCHMARKS.md.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import profile_step  # noqa: E402  pylint: disable=wrong-import-position

FWD = "jit(train_step)/jvp(VisionTransformer)/Transformer/encoderblock_3/"
BWD = "jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/encoderblock_3/"


@pytest.mark.parametrize("op_name, scoped, want", [
    # vit_cls: named scopes from vit_cls/speed.py; what else sits in the attention module is `out`.
    (FWD + "MultiHeadDotProductAttention_0/qkv_projection/dot_general", True, "QKV projection"),
    (BWD + "MultiHeadDotProductAttention_0/attention_core/dot_general", True, "attention core"),
    (FWD + "MultiHeadDotProductAttention_0/dot_general", True, "attention out proj"),
    # The original: flax's attention with query/key/value/out submodules, the core unscoped.
    (FWD + "MultiHeadDotProductAttention_0/key/dot_general", False, "QKV projection"),
    (FWD + "MultiHeadDotProductAttention_0/out/dot_general", False, "attention out proj"),
    (BWD + "MultiHeadDotProductAttention_0/exp", False, "attention core"),
    (FWD + "MlpBlock_0/Dense_1/dot_general", False, "MLP products"),
    (BWD + "MlpBlock_0/tanh", False, "MLP element-wise"),
    (BWD + "LayerNorm_1/reduce_sum", False, "layer norms"),
    (FWD + "add", False, "residual/pos adds"),
    ("jit(train_step)/jvp(VisionTransformer)/embedding/conv_general_dilated", False, "patch embedding"),
    ("jit(train_step)/jvp(VisionTransformer)/head/dot_general", False, "head + loss"),
    ("jit(train_step)/sqrt", False, "optimizer update"),
    ("o[1].mu['head']['kernel']", False, "optimizer update"),
])
def test_op_names_are_classed(op_name, scoped, want):
  assert profile_step.classify(op_name, scoped) == want


def test_overlapping_ops_share_their_time_and_the_shares_add_up_to_the_busy_time():
  # a: 0-10 ms alone for 0-4, shared with b for 4-6; b: 4-8; c: 20-21 after a gap. Times in us.
  spans = [(0, 6000, "a"), (4000, 8000, "b"), (20000, 21000, "c")]
  shares, busy = profile_step._shares_ms(spans)  # pylint: disable=protected-access
  assert shares == pytest.approx({"a": 5.0, "b": 3.0, "c": 1.0})
  assert busy == pytest.approx(9.0)  # the union: 0-8 and 20-21
  assert sum(shares.values()) == pytest.approx(busy)


def test_a_fusion_is_classed_by_the_products_inside_it():
  hlo = """HloModule m

%fused_computation.1 (p0: f32[4,8], p1: f32[8,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  %dot.1 = f32[4,8]{1,0} dot(%p0, %p1), metadata={op_name="%sMlpBlock_0/Dense_0/dot_general"}
  %a.1 = f32[4,8]{1,0} add(%dot.1, %dot.1), metadata={op_name="%sLayerNorm_0/add"}
  %a.2 = f32[4,8]{1,0} add(%a.1, %a.1), metadata={op_name="%sLayerNorm_0/add"}
  ROOT %t.1 = f32[4,8]{1,0} tanh(%a.2), metadata={op_name="%sLayerNorm_0/tanh"}
}

ENTRY %main (x: f32[4,8], w: f32[8,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,8]{1,0} parameter(1)
  ROOT %ynn_fusion.1 = f32[4,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1
}
""".replace("%s", FWD)
  cls, opcode, shape, has_dot = profile_step.parse_hlo(hlo)["ynn_fusion.1"]
  assert (cls, opcode, shape, has_dot) == ("MLP products", "fusion", "f32[4,8]{1,0}", True)
