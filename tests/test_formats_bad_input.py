"""Bad foreign checkpoints end in one line naming the file, the tensor and what was expected."""

import json
import os
import shutil
import struct

import numpy as np
import pytest

import vit_cls
from vit_cls.errors import CheckpointError
from vit_cls.formats import safetensors as st

ZOO = os.path.join(os.path.dirname(__file__), "fixtures", "zoo")


def one_line_error(path, match, **overrides):
  with pytest.raises(CheckpointError, match=match) as e:
    vit_cls.load(path, **overrides)
  assert "\n" not in str(e.value) and str(path) in str(e.value)
  return str(e.value)


def foreign_file(tmp_path, family):
  """A zero-filled state dict with the names and shapes of a tiny real timm model of `family`."""
  shapes = json.load(open(os.path.join(ZOO, "foreign.json")))[family]
  path = tmp_path / f"{family}.safetensors"
  st.write(path, {k: np.zeros(v, np.float32) for k, v in shapes.items()})
  return path


@pytest.mark.parametrize("family, match", [
    ("convnext", r"tensor 'stages\.0\.blocks\.0\.conv_dw\.bias' \(8,\) belongs to a ConvNeXt"),
    ("swin", r"tensor 'layers\.0\.blocks\.0\.[^']+' \(\d+,?[\d, ]*\) belongs to a Swin Transformer"),
    ("deit_distilled", r"tensor 'dist_token' \(1, 1, 24\): a DeiT with a distillation token"),
])
def test_other_architectures_are_named(tmp_path, family, match):
  one_line_error(foreign_file(tmp_path, family), match)


def fixture_copy(tmp_path, name="timm_augreg"):
  folder = tmp_path / name
  shutil.copytree(os.path.join(ZOO, name), folder)
  return folder, folder / "model.safetensors"


def test_truncated_file(tmp_path):
  folder, path = fixture_copy(tmp_path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])
  one_line_error(folder, r"model\.safetensors: not a valid safetensors file: tensor '[^']+': ends at "
                         r"byte [\d,]+ of a data buffer of [\d,]+ bytes \(truncated file\?\)")
  path.write_bytes(data[:5])
  one_line_error(folder, r"5 bytes, shorter than the 8-byte header length")


def test_header_with_absurd_sizes(tmp_path):
  folder, path = fixture_copy(tmp_path)
  data = path.read_bytes()
  path.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])
  one_line_error(folder, r"the header claims 4,611,686,018,427,387,904 bytes but the file has")
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  header["head.bias"]["shape"] = [10 ** 12]
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
  one_line_error(folder, r"tensor 'head\.bias': shape \[1000000000000\] of F32 needs 4,000,000,000,000 "
                         r"bytes, data_offsets give 20")


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({"blocks.1.mlp.fc2.weight": t["blocks.1.mlp.fc2.weight"][:, :40]}),
     r"tensor 'blocks\.1\.mlp\.fc2\.weight' \(24, 40\): expected shape \(24, 48\)"),
    (lambda t: t.update({"blocks.0.norm1.weight": t["blocks.0.norm1.weight"].astype(np.int32)}),
     r"tensor 'blocks\.0\.norm1\.weight' \(24,\): dtype int32, expected a floating-point tensor"),
    (lambda t: t.pop("blocks.1.attn.proj.weight"),
     r"tensor 'blocks\.1\.attn\.proj\.weight' is missing; a timm ViT state dict has it with shape "
     r"\(24, 24\)"),
    (lambda t: t.update({"blocks.0.attn.q_norm.weight": np.ones(8, np.float32)}),
     r"tensor 'blocks\.0\.attn\.q_norm\.weight' \(8,\): not part of a ViT that vit_cls can build"),
])
def test_wrong_shape_dtype_missing_or_unknown_tensor(tmp_path, change, match):
  folder, path = fixture_copy(tmp_path)
  tensors, meta = st.read(path)
  change(tensors)
  st.write(path, tensors, meta)
  one_line_error(folder, match)


def test_hf_missing_tensor_and_other_model_type(tmp_path):
  folder, path = fixture_copy(tmp_path, "hf_vit_classifier")
  tensors, meta = st.read(path)
  del tensors["vit.encoder.layer.1.intermediate.dense.bias"]
  st.write(path, tensors, meta)
  one_line_error(folder, r"tensor 'vit\.encoder\.layer\.1\.intermediate\.dense\.bias' is missing; a "
                         r"Hugging Face ViT state dict has it with shape \(48,\)")
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(dict(config, model_type="dinov2")))
  one_line_error(folder, r"config\.json has model_type 'dinov2'")


def test_pickled_weights_are_never_opened(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  one_line_error(tmp_path / "pytorch_model.bin", r"a pickled PyTorch file, which is never loaded")
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
  one_line_error(tmp_path, r"model\.safetensors: missing; the folder has only pickled PyTorch weights")


def test_overlapping_offsets_and_bad_json(tmp_path):
  header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
  raw = json.dumps(header).encode()
  path = tmp_path / "x.safetensors"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
  one_line_error(path, r"tensor 'b' starts at byte 4, expected 8 \(overlapping or gapped data_offsets\)")
  path.write_bytes(struct.pack("<Q", 5) + b"{abc}")
  one_line_error(path, r"the header is not JSON")


def _raw_header_file(tmp_path, raw: bytes, data: bytes = b""):
  path = tmp_path / "x.safetensors"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  return path


@pytest.mark.parametrize("raw, data, match", [
    # numpy cannot make an array this large even though it is empty (ValueError before).
    (b'{"a":{"dtype":"F32","shape":[0,1000000000000000000000000000000],"data_offsets":[0,0]}}', b"",
     r"tensor 'a': shape \[0, 10+\] is larger than any array can be"),
    (b'{"a":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}', b"",
     r"tensor 'a': shape \[0, 4611686018427387904\] is larger than any array can be"),
    # JSON booleans are not dimensions (a TypeError before).
    (b'{"a":{"dtype":"F32","shape":[true,2],"data_offsets":[0,8]}}', bytes(8),
     r"tensor 'a': shape \[True, 2\] is not a list of non-negative integers"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[false,8]}}', bytes(8),
     r"tensor 'a': data_offsets \[False, 8\] is not \[begin, end\]"),
    # A header nested 200,000 deep (a RecursionError before).
    (b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"", r"the header's JSON nests too deeply"),
    # The same name twice: json.loads kept the last one silently before.
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
     b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8),
     r"the header names tensor 'a' twice"),
])
def test_odd_headers_are_the_readers_one_line_error(tmp_path, raw, data, match):
  path = _raw_header_file(tmp_path, raw, data)
  with pytest.raises(CheckpointError, match=match) as e:
    st.read(path)
  assert "\n" not in str(e.value) and str(path) in str(e.value)
  one_line_error(path, match)  # and through vit_cls.load, which sniffs the format first
