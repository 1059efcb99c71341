"""Export a checkpoint for serving without this project's code: StableHLO, TF SavedModel or ONNX.

  python -m vit_cls.export_serving --checkpoint WORKDIR_NPZ_SAFETENSORS_OR_FOLDER \\
      --format stablehlo|savedmodel|onnx --out DIR [--no_preprocess] [--overwrite]

What each format holds (DIR/serving.json describes any of them: input shape and dtype, outputs, class
names, preprocessing):

- `stablehlo`: DIR/model.stablehlo, a `jax.export` serialization with a symbolic batch dimension, lowered
  for CPU, CUDA and TPU in one artifact. `jax.export.deserialize(bytearray(f.read())).call(images)`
  runs it with nothing but jax installed.
- `savedmodel`: DIR/1/ (TF Serving's numbered version folder), made with jax2tf. Signatures
  `serving_default` (uint8 images [batch, H, W, 3]) and `serving_bytes` (encoded JPEG/PNG/GIF/BMP
  strings, any size: decoded and resized in TensorFlow to the input size first).
- `onnx`: DIR/model.onnx, made with jax2onnx at opset `ONNX_OPSET`, dynamic batch ("batch").

Inputs. By default the program takes uint8 RGB images [batch, H, W, 3] and applies the checkpoint's own
preprocessing in the graph, exactly as `vit_cls.predict` does (the same `predict.normalize`, and the
centre crop `predict.eval_resize` implies): H, W is the model's image size for this project's
checkpoints, and the size the imported transform resizes to before its centre crop for a timm/HF one
with `crop_pct` (e.g. 17x17 for a 16x16 SigLIP with crop_pct 0.9). Resizing images of any other size is
the caller's job (the SavedModel's `serving_bytes` does it), because the resize predict applies (PIL,
per image) has no exact graph equivalent. `--no_preprocess` exports the bare model instead: float32
model inputs [batch, h, w, 3] already preprocessed.

Outputs: `logits`, `probabilities` (softmax), `top5_indices`, `top5_probabilities` (top-k of fewer
classes when the model has fewer than 5), and in the SavedModel `top5_labels` (class names, or the
indices as strings when the checkpoint has none; ONNX and StableHLO users find the names in
serving.json, and ONNX's in its metadata too). A model without a classification head (num_classes=0,
e.g. a SigLIP image tower) returns `features`, the pooled embedding, instead.

Why here and not in vit_cls.model: TensorFlow and ONNX are imported only by this module, and only by
the format being written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Sequence

if __name__ == "__main__":  # before numpy and JAX: the memory allocator (as vit_cls.predict)
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup(file=sys.stderr)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_cls import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_cls import predict as predict_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

FORMATS = ("stablehlo", "savedmodel", "onnx")
# Lowered for all three in one artifact: the caller's backend picks its lowering at run time.
PLATFORMS = ("cpu", "cuda", "tpu")
# 21 rather than jax2onnx's default 23: ONNX Runtime 1.20 (2024-11) and later run it, and nothing in a
# ViT needs the newer opsets' operators.
ONNX_OPSET = 21
TOP_K = 5
SAVEDMODEL_VERSION = "1"


# The newest StableHLO version a SavedModel's embedded program is written in. TensorFlow runs it through
# its own, older StableHLO (2.21, the newest TensorFlow, has 1.13.7). jax 0.10.2 writes 1.15.0 and
# TensorFlow 2.21 runs that; jax 0.12 writes 1.18.0, in which the shape-polymorphic batch check becomes
# `vhlo.custom_call_v2`, an operation TensorFlow 2.21 refuses ("unregistered operation").
SAVEDMODEL_STABLEHLO_VERSION = "1.15.0"


@contextlib.contextmanager
def _stablehlo_tensorflow_reads():
  """Within: what jax.export writes is a program TensorFlow 2.21 can run (jax2tf embeds it as it is).

  Two differences from jax 0.12's own choice, both for TensorFlow's older StableHLO, neither with an
  option in jax (so the two private hooks are swapped here and put back on the way out):
  - the version is capped at SAVEDMODEL_STABLEHLO_VERSION (jax picks "4 weeks old" itself in
    `_export._module_to_bytecode`); StableHLO writes an older version by downgrading each operation,
    and one it cannot write fails the export, never the serving;
  - `erfc` (exact GELU: DINOv2, CLIP, SigLIP and timm's models use it) is lowered to plain StableHLO
    arithmetic, jax's own float32 expansion of it. jax 0.12 emits CHLO's `erfc`, which its serialiser
    wraps in a `composite` whose decomposition TensorFlow 2.21 cannot shape-refine for a dynamic batch
    ("operand at index 0 has type 'tensor<2x3xf32>', but decomposition has type 'tensor<?x3xf32>'").
  On jax 0.10.2 both are what jax does anyway.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax._src.export import _export  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  from jax._src.lax import special  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import hlo  # pylint: disable=g-import-not-at-top

  def as_tuple(version):
    return tuple(int(part) for part in version.split("."))

  jax_choice = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_4)
  target = min(jax_choice, SAVEDMODEL_STABLEHLO_VERSION, key=as_tuple)

  def module_to_bytecode(module):
    return _jax.mlir.serialize_portable_artifact(module, target,
                                                  xla_bridge.get_backend().serialize_with_sdy)

  original_bytecode, original_erfc = _export._module_to_bytecode, mlir._lowerings[special.erfc_p]
  _export._module_to_bytecode = module_to_bytecode
  if as_tuple(jax_choice) > as_tuple(SAVEDMODEL_STABLEHLO_VERSION):  # jax 0.11+: the composite erfc
    from jax._src.lax.erf import erfc_impl  # pylint: disable=g-import-not-at-top
    erfc_as_arithmetic = mlir.lower_fun(erfc_impl, multiple_results=False)
    mlir.register_lowering(special.erfc_p, lambda ctx, x, **_: erfc_as_arithmetic(ctx, x))
  try:
    yield
  finally:
    _export._module_to_bytecode = original_bytecode
    mlir._lowerings[special.erfc_p] = original_erfc


@dataclasses.dataclass
class ServingSpec:
  """What the exported program takes and how it turns that into model inputs."""

  input_hw: tuple[int, int]  # the program's image size
  model_hw: tuple[int, int]  # the model's
  crop_top_left: tuple[int, int]  # where the model's window sits in the input (a centre crop)
  preprocessing: dict | None  # None: --no_preprocess (the program takes model inputs)
  label_names: list[str]
  num_classes: int  # 0: no head, the program returns features

  @property
  def input_dtype(self) -> str:
    return "uint8" if self.preprocessing else "float32"

  @property
  def top_k(self) -> int:
    return min(TOP_K, self.num_classes)

  def output_names(self, *, with_labels: bool = False) -> list[str]:
    if not self.num_classes:
      return ["features"]
    return (["logits", "probabilities", "top5_indices", "top5_probabilities"] +
            (["top5_labels"] if with_labels else []))

  def describe(self, fmt: str, files: list[str]) -> dict:
    """serving.json: enough to call the artifact without reading this project's code."""
    h, w = self.input_hw
    return {
        "format": fmt, "files": files,
        "input": {"name": "images", "shape": ["batch", h, w, 3], "dtype": self.input_dtype},
        "outputs": self.output_names(with_labels=fmt == "savedmodel"),
        "label_names": self.label_names, "model_image_size": list(self.model_hw),
        "preprocessing": self.preprocessing,
        "preprocessing_in_graph": ("centre crop {}x{} at (top, left) {}, then the normalisation "
                                   "above".format(*self.model_hw, list(self.crop_top_left))
                                   if self.preprocessing else None),
        "platforms": list(PLATFORMS) if fmt != "onnx" else None,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
    }


def serving_spec(loaded: ckpt_lib.LoadedCheckpoint, *, preprocess: bool = True) -> ServingSpec:
  """The input geometry predict's preprocessing implies for `loaded`, as a fixed-size program input.

  For an imported checkpoint with `crop_pct`, the input is the size predict resizes to before its centre
  crop; for an image already of that size, predict's resize is a no-op (PIL returns a copy) and only
  the crop and the normalisation remain: exactly what the exported graph does.
  """
  h, w = ckpt_lib.hw(loaded.image_size)
  pp = loaded.preprocessing
  ih, iw = h, w
  if preprocess and pp and pp.get("source") != "vit_cls":
    # A fixed point of eval_resize: the size such that resizing it is the identity.
    iw, ih = predict_lib.eval_resize((w, h), h, w, pp)
    iw, ih = predict_lib.eval_resize((iw, ih), h, w, pp)
  model = loaded.model
  names = [str(n) for n in loaded.label_names] if loaded.label_names else []
  if model.num_classes and len(names) != model.num_classes:
    names = [str(i) for i in range(model.num_classes)]
  return ServingSpec(input_hw=(ih, iw), model_hw=(h, w),
                     crop_top_left=((ih - h) // 2, (iw - w) // 2),
                     preprocessing=dict(pp) if preprocess and pp else None,
                     label_names=names, num_classes=int(model.num_classes or 0))


def serving_function(loaded: ckpt_lib.LoadedCheckpoint, spec: ServingSpec, *, top_k: bool = True,
                     params_as_argument: bool = False) -> Callable:
  """The JAX function every format exports: images -> {output name: array}.

  `top_k=False` leaves the top-k to the caller (the SavedModel does it in TensorFlow: TF 2.21 cannot
  read the `top_k` composite op that jax 0.10 emits). `params_as_argument=True` makes it
  `f(params, images)` so that jax2tf can keep the weights as TF variables instead of graph constants.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = loaded.model
  (top, left), (h, w) = spec.crop_top_left, spec.model_hw

  def apply(params, images):
    x = images
    if spec.preprocessing:
      x = x.astype(jnp.float32)[:, top:top + h, left:left + w, :]
      x = predict_lib.normalize(x, spec.preprocessing, xp=jnp)
    y = model.apply({"params": params}, x, train=False)
    if not spec.num_classes:
      return {"features": y}
    # The same float32 softmax over the same logits as predict's jitted `apply`.
    out = {"logits": y, "probabilities": jax.nn.softmax(y, axis=-1)}
    if top_k:
      out["top5_probabilities"], out["top5_indices"] = jax.lax.top_k(out["probabilities"], spec.top_k)
    return out

  if params_as_argument:
    return apply
  return lambda images: apply(loaded.params, images)


# ----------------------------------------------------------------------------------------------------
# The three writers: each fills an empty folder.


def write_stablehlo(loaded, spec: ServingSpec, out_dir: str) -> list[str]:
  """DIR/model.stablehlo: `jax.export` with batch dimension `b` symbolic, for every platform in
  PLATFORMS. The weights are constants inside the program: one file, nothing else to ship."""
  import jax  # pylint: disable=g-import-not-at-top
  h, w = spec.input_hw
  batch, = jax.export.symbolic_shape("batch")
  fn = jax.jit(serving_function(loaded, spec))
  exported = jax.export.export(fn, platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((batch, h, w, 3), np.dtype(spec.input_dtype)))
  with open(os.path.join(out_dir, "model.stablehlo"), "wb") as f:
    f.write(exported.serialize())
  return ["model.stablehlo"]


def write_onnx(loaded, spec: ServingSpec, out_dir: str) -> list[str]:
  """DIR/model.onnx via jax2onnx, checked by onnx's checker; class names in its metadata too."""
  import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  # jax2onnx imports every plugin it has on first use, and logs a traceback for each one whose library
  # is absent (equinox, dm-pix: other model libraries, not needed for a Flax ViT).
  logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  h, w = spec.input_hw
  fn = serving_function(loaded, spec)
  names = spec.output_names()
  # jax2onnx names outputs in the order the function returns them: a tuple in `names`' order.
  proto = to_onnx(lambda x: tuple(fn(x)[k] for k in names),
                  [jax.ShapeDtypeStruct(("batch", h, w, 3), np.dtype(spec.input_dtype))],
                  model_name="vit_cls", opset=ONNX_OPSET, input_names=["images"], output_names=names)
  for key, value in (("label_names", json.dumps(spec.label_names)),
                     ("preprocessing", json.dumps(spec.preprocessing))):
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  onnx.checker.check_model(proto)
  onnx.save(proto, os.path.join(out_dir, "model.onnx"))
  return ["model.onnx"]


@_stablehlo_tensorflow_reads()
def write_savedmodel(loaded, spec: ServingSpec, out_dir: str) -> list[str]:
  """DIR/1/: a SavedModel from jax2tf, weights as variables.

  jax2tf rather than orbax-export: it ships with jax (no new dependency, and orbax-export is itself a
  wrapper around jax2tf that adds a pin on orbax-checkpoint's version range), and the two signatures
  here are a few lines of tf.function either way.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  h, w = spec.input_hw
  module = tf.Module()
  module.params = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False),
                                        loaded.params)
  converted = jax2tf.convert(serving_function(loaded, spec, top_k=False, params_as_argument=True),
                             polymorphic_shapes=[None, "(batch, ...)"], with_gradient=False,
                             native_serialization_platforms=PLATFORMS)
  labels = tf.constant(spec.label_names or [""])
  dtype = tf.uint8 if spec.preprocessing else tf.float32

  def run(images):
    # Without this, a wrong shape fails deep inside XlaCallModule with a page of MLIR.
    tf.debugging.assert_equal(
        tf.shape(images)[1:], tf.constant([h, w, 3]),
        message=f"images must be {spec.input_dtype} [batch, {h}, {w}, 3]")
    out = converted(module.params, images)
    if spec.num_classes:
      out["top5_probabilities"], out["top5_indices"] = tf.math.top_k(out["probabilities"], spec.top_k)
      out["top5_labels"] = tf.gather(labels, out["top5_indices"])
    return out

  @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], dtype, name="images")],
               autograph=False)
  def serve_images(images):
    return run(images)

  signatures = {"serving_default": serve_images}
  if spec.preprocessing:
    resize_method = ("bicubic" if spec.preprocessing.get("interpolation") == "bicubic"
                     and spec.preprocessing.get("source") != "vit_cls" else "bilinear")

    def decode(data):
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
      image.set_shape([None, None, 3])
      # As predict: bilinear without antialiasing for this project's checkpoints (its eval pipeline),
      # and PIL-like antialiased resampling, rounded to uint8 like PIL, for imported ones.
      # The resized pixels are rounded to uint8, as PIL's are (predict keeps this project's resize in
      # float: under 0.5/127.5 apart per pixel). An image already H x W is not resampled at all.
      def resize():
        resized = tf.image.resize(image, [h, w], method=resize_method,
                                  antialias=resize_method == "bicubic")
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
      same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [h, w]))
      return tf.cond(same, lambda: tf.cast(image, tf.uint8), resize)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
                 autograph=False)
    def serve_bytes(image_bytes):
      images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([h, w, 3], tf.uint8))
      return run(images)

    signatures["serving_bytes"] = serve_bytes
  module.serve_images = serve_images
  path = os.path.join(out_dir, SAVEDMODEL_VERSION)
  tf.saved_model.save(module, path, signatures=signatures)
  return [SAVEDMODEL_VERSION + "/"]


WRITERS = {"stablehlo": write_stablehlo, "savedmodel": write_savedmodel, "onnx": write_onnx}


def export(checkpoint: str, fmt: str, out_dir: str, *, preprocess: bool = True,
           overwrite: bool = False) -> dict:
  """Writes `checkpoint` as `fmt` into `out_dir` (local); returns what serving.json says.

  The folder is built next to `out_dir` and renamed into place, so a failed export leaves no half
  folder and `--overwrite` replaces the old one only once the new one is complete.
  """
  if fmt not in WRITERS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
  loaded = ckpt_lib.load_with_info(checkpoint)
  spec = serving_spec(loaded, preprocess=preprocess)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export_serving_", dir=parent)
  try:
    files = WRITERS[fmt](loaded, spec, tmp)
    info = spec.describe(fmt, files)
    info["checkpoint"] = loaded.source.path
    with open(os.path.join(tmp, "serving.json"), "w") as f:
      json.dump(info, f, indent=1)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return info


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vit_cls.export_serving",
      description="Export a checkpoint as StableHLO, a TF SavedModel or ONNX for serving.")
  parser.add_argument("--checkpoint", required=True,
                      help="workdir, orbax step dir, .npz, .safetensors, or timm/HF folder")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="output folder (the ONNX file is OUT/model.onnx)")
  parser.add_argument("--no_preprocess", action="store_true",
                      help="export the bare model: float32 model inputs -> outputs")
  parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  args = parser.parse_args(argv)
  try:
    info = export(args.checkpoint, args.format, args.out, preprocess=not args.no_preprocess,
                  overwrite=args.overwrite)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, KeyError, OSError) as e:
    print(f"error: {args.checkpoint}: cannot export: {str(e).splitlines()[0] if str(e) else e!r}",
          file=sys.stderr)
    return 2
  shape = "x".join(str(d) for d in info["input"]["shape"])
  print(f"{args.out}: {args.format}, input images {info['input']['dtype']} [{shape}], "
        f"outputs {', '.join(info['outputs'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
