"""vit_cls.export_serving: StableHLO, SavedModel and ONNX exports against vit_cls.predict.

Three checkpoints: one trained here by `train.train_and_evaluate` (a 1-layer width-32 ViT, 16x16), the
imported DINOv2-with-registers fixture (28x28, crop_pct 1.0) and the MAP-head SigLIP fixture (no head:
features; 16x16 with crop_pct 0.9, so a 17x17 input centre-cropped in the graph). Each export is written
once per module (`exported`) and checked on batch 37 and batch 1 of the same images, which predict reads
as PNG files.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vit_cls import checkpoint as ckpt_lib
from vit_cls import export_serving as es
from vit_cls import predict as predict_lib

ZOO = os.path.join(os.path.dirname(__file__), "fixtures", "zoo")
N = 37
# float32 against float32: the same XLA program for StableHLO and the SavedModel, and a different
# kernel library (ONNX Runtime) for ONNX; the largest difference seen is printed by each parity test.
TOL = 1e-5


def _tiny_trained(workdir):
  from configs import default  # pylint: disable=g-import-not-at-top
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  config = default.get_config()  # conftest's tiny_config (function-scoped there)
  config.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                           representation_size=32, attention_impl="einsum"))
  config.update(dict(total_steps=12, warmup_steps=2, batch_size=32, eval_batch_size=64, log_every=4,
                     eval_every=12, checkpoint_every=6, shuffle_buffer=256))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def checkpoints(root):
  return {"trained": _tiny_trained(str(root / "work")),
          "dinov2_reg": os.path.join(ZOO, "timm_dinov2_reg"),
          "siglip_map": os.path.join(ZOO, "timm_siglip")}


class Reference:
  """One checkpoint's test images (uint8 at the export's input size, and as PNG files) and what
  vit_cls.predict makes of them."""

  def __init__(self, checkpoint, folder):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    self.loaded = ckpt_lib.load_with_info(checkpoint)
    self.spec = es.serving_spec(self.loaded)
    h, w = self.spec.input_hw
    self.images = np.random.RandomState(0).randint(0, 256, (N, h, w, 3)).astype(np.uint8)
    os.makedirs(folder, exist_ok=True)
    self.paths = [os.path.join(folder, f"{i}.png") for i in range(N)]
    self.png = []
    for path, image in zip(self.paths, self.images):
      Image.fromarray(image).save(path)
      with open(path, "rb") as f:
        self.png.append(f.read())
    # predict's own model inputs, and the model on them (predict returns only probabilities).
    self.model_inputs = np.stack([predict_lib.load_image(p, self.loaded.image_size,
                                                         self.loaded.preprocessing)
                                  for p in self.paths])
    model, params = self.loaded.model, self.loaded.params
    out = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x, train=False))(
        self.model_inputs))
    self.expected = {"features": out} if not self.spec.num_classes else {"logits": out}
    if self.spec.num_classes:
      # vit_cls.predict itself: every class, ranked, with its probability.
      ranked = predict_lib.predict(checkpoint, self.paths, k=self.spec.num_classes)
      names = self.spec.label_names
      probs = np.zeros((N, self.spec.num_classes), np.float32)
      for i, (_, row) in enumerate(ranked):
        for label, p in row:
          probs[i, names.index(str(label)) if self.loaded.label_names else int(label)] = p
      self.expected["probabilities"] = probs
      self.expected_top = np.argsort(-probs, axis=1, kind="stable")[:, :self.spec.top_k]

  def check(self, outputs: dict, batch: int, what: str) -> float:
    """Asserts `outputs` (numpy, for the first `batch` images) match predict; the largest |diff|."""
    worst = 0.0
    for key, want in self.expected.items():
      got = np.asarray(outputs[key])
      assert got.shape == want[:batch].shape, (what, key, got.shape)
      worst = max(worst, float(np.abs(got - want[:batch]).max()))
    assert worst <= TOL, f"{what}: max |diff| {worst:.2e} > {TOL}"
    if self.spec.num_classes:
      np.testing.assert_array_equal(np.asarray(outputs["top5_indices"]), self.expected_top[:batch])
      np.testing.assert_allclose(np.asarray(outputs["top5_probabilities"]),
                                 np.take_along_axis(self.expected["probabilities"][:batch],
                                                    self.expected_top[:batch], 1), atol=TOL)
    return worst


@pytest.fixture(scope="module")
def references(checkpoints, root):
  return {name: Reference(path, str(root / "images" / name)) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def exported(checkpoints, root):
  """`exported(name, fmt)`: the export's folder, written on first use."""
  done = {}

  def get(name, fmt, **kwargs):
    key = (name, fmt, tuple(sorted(kwargs.items())))
    if key not in done:
      out = str(root / "exports" / f"{name}_{fmt}_{len(done)}")
      es.export(checkpoints[name], fmt, out, **kwargs)
      done[key] = out
    return done[key]

  return get


NAMES = ["trained", "dinov2_reg", "siglip_map"]


# ----------------------------------------------------------------------------------------------------
# StableHLO: run where vit_cls cannot be imported.

_RUN_STABLEHLO = textwrap.dedent("""
    import sys
    sys.modules["vit_cls"] = None  # `import vit_cls` now fails, whatever is installed
    import json, numpy as np, jax
    jax.config.update("jax_platforms", "cpu")
    for folder, images, out in json.loads(sys.argv[1]):
      with open(folder + "/model.stablehlo", "rb") as f:
        program = jax.export.deserialize(bytearray(f.read()))
      x = np.load(images)
      results = {}
      for batch in (len(x), 1):
        for k, v in program.call(x[:batch]).items():
          results[f"{batch}/{k}"] = np.asarray(v)
      np.savez(out, platforms=np.array(program.platforms), **results)
    try:
      import vit_cls  # noqa
      print("vit_cls importable")
    except ImportError:
      print("vit_cls not importable")
""")


def test_stablehlo_parity_without_vit_cls(references, exported, root):
  jobs = []
  for name in NAMES:
    ref = references[name]
    np.save(str(root / f"{name}_images.npy"), ref.images)
    jobs.append((exported(name, "stablehlo"), str(root / f"{name}_images.npy"),
                 str(root / f"{name}_stablehlo_out.npz")))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  proc = subprocess.run([sys.executable, "-c", _RUN_STABLEHLO, json.dumps(jobs)], cwd=str(root),
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("vit_cls not importable")
  for name, (_, _, out) in zip(NAMES, jobs):
    results = np.load(out)
    assert list(results["platforms"]) == ["cpu", "cuda", "tpu"]
    for batch in (N, 1):
      got = {k.split("/", 1)[1]: results[k] for k in results.files if k.startswith(f"{batch}/")}
      worst = references[name].check(got, batch, f"stablehlo {name} batch {batch}")
      print(f"parity stablehlo {name} batch {batch}: max |diff| {worst:.1e}")


# ----------------------------------------------------------------------------------------------------
# ONNX, with onnxruntime


def _need_jax2onnx():
  pytest.importorskip("jax2onnx", reason="pip install --no-deps -r requirements-export.txt")


def _onnx_session(folder):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  return ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", NAMES)
def test_onnx_parity(name, references, exported):
  _need_jax2onnx()
  import onnx  # pylint: disable=g-import-not-at-top
  ref = references[name]
  folder = exported(name, "onnx")
  model = onnx.load(os.path.join(folder, "model.onnx"))
  assert {o.domain: o.version for o in model.opset_import}[""] == es.ONNX_OPSET
  meta = {p.key: p.value for p in model.metadata_props}
  assert json.loads(meta["label_names"]) == ref.spec.label_names
  session = _onnx_session(folder)
  (inp,) = session.get_inputs()
  assert inp.name == "images" and inp.type == "tensor(uint8)"
  assert inp.shape == ["batch", *ref.spec.input_hw, 3]  # the batch dimension is dynamic
  names = [o.name for o in session.get_outputs()]
  assert names == ref.spec.output_names()
  for batch in (N, 1):
    got = dict(zip(names, session.run(None, {"images": ref.images[:batch]})))
    worst = ref.check(got, batch, f"onnx {name} batch {batch}")
    print(f"parity onnx {name} batch {batch}: max |diff| {worst:.1e}")


# ----------------------------------------------------------------------------------------------------
# SavedModel, as TF Serving would load it


@pytest.fixture(scope="module")
def savedmodels(exported):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {name: tf.saved_model.load(os.path.join(exported(name, "savedmodel"), "1")) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_savedmodel_parity_both_signatures(name, references, exported, savedmodels):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ref = references[name]
  folder = exported(name, "savedmodel")
  assert sorted(os.listdir(folder)) == ["1", "serving.json"]  # TF Serving: base path, version 1
  assert os.path.exists(os.path.join(folder, "1", "saved_model.pb"))
  signatures = savedmodels[name].signatures
  assert set(signatures) == {"serving_default", "serving_bytes"}
  for batch in (N, 1):
    by_signature = {
        "serving_default": signatures["serving_default"](images=tf.constant(ref.images[:batch])),
        # PNGs at the input size: decoded, not resampled, so the same numbers.
        "serving_bytes": signatures["serving_bytes"](image_bytes=tf.constant(ref.png[:batch])),
    }
    for sig, out in by_signature.items():
      got = {k: v.numpy() for k, v in out.items()}
      assert sorted(got) == sorted(ref.spec.output_names(with_labels=True))
      worst = ref.check(got, batch, f"savedmodel {sig} {name} batch {batch}")
      print(f"parity savedmodel {sig} {name} batch {batch}: max |diff| {worst:.1e}")
      if ref.spec.num_classes:
        labels = [[s.decode() for s in row] for row in got["top5_labels"]]
        assert labels == [[ref.spec.label_names[i] for i in row] for row in ref.expected_top[:batch]]


def test_savedmodel_bytes_resizes_any_image(references, savedmodels):
  """A grayscale JPEG of another size: decoded as RGB, resized to the input size, classified."""
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.random.RandomState(3).randint(0, 256, (9, 13), dtype=np.uint8), "L").save(
      buf, format="JPEG")
  out = savedmodels["dinov2_reg"].signatures["serving_bytes"](
      image_bytes=tf.constant([buf.getvalue(), references["dinov2_reg"].png[0]]))
  probs = out["probabilities"].numpy()
  assert probs.shape == (2, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# --no_preprocess: float32 model inputs, as predict.load_image makes them


@pytest.mark.parametrize("fmt", es.FORMATS)
def test_no_preprocess_takes_model_inputs(fmt, references, exported):
  if fmt == "onnx":
    _need_jax2onnx()
  ref = references["dinov2_reg"]
  folder = exported("dinov2_reg", fmt, preprocess=False)
  info = json.load(open(os.path.join(folder, "serving.json")))
  assert info["input"] == {"name": "images", "shape": ["batch", 28, 28, 3], "dtype": "float32"}
  assert info["preprocessing"] is None
  x = ref.model_inputs
  if fmt == "stablehlo":
    import jax  # pylint: disable=g-import-not-at-top
    with open(os.path.join(folder, "model.stablehlo"), "rb") as f:
      got = jax.export.deserialize(bytearray(f.read())).call(x)
  elif fmt == "onnx":
    session = _onnx_session(folder)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    loaded = tf.saved_model.load(os.path.join(folder, "1"))
    assert set(loaded.signatures) == {"serving_default"}  # no encoded-image signature without pp
    got = loaded.signatures["serving_default"](images=tf.constant(x))
  ref.check({k: np.asarray(v) for k, v in got.items()}, N, f"{fmt} --no_preprocess")


# ----------------------------------------------------------------------------------------------------
# Bad input: one line each


def test_unknown_format_is_refused(capsys):
  with pytest.raises(SystemExit) as e:
    es.main(["--checkpoint", os.path.join(ZOO, "timm_siglip"), "--format", "tflite", "--out", "x"])
  assert e.value.code == 2
  assert "invalid choice: 'tflite'" in capsys.readouterr().err.splitlines()[-1]
  with pytest.raises(ValueError, match="unknown format 'tflite'; choose one of stablehlo, savedmodel, onnx"):
    es.export(os.path.join(ZOO, "timm_siglip"), "tflite", "x")


@pytest.mark.parametrize("what", ["garbage.npz", "missing"])
def test_checkpoint_that_does_not_load_is_one_line(what, tmp_path, capsys):
  path = tmp_path / what
  if what.endswith(".npz"):
    path.write_bytes(b"not a checkpoint")
  out = tmp_path / "out"
  assert es.main(["--checkpoint", str(path), "--format", "stablehlo", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {path}: cannot export: "), err
  assert not out.exists() and os.listdir(tmp_path) == ([what] if path.exists() else [])


def test_existing_out_dir_needs_overwrite(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("keep me")
  argv = ["--checkpoint", os.path.join(ZOO, "timm_siglip"), "--format", "stablehlo", "--out", str(out)]
  assert es.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {out} exists; pass --overwrite to replace it"]
  assert os.listdir(out) == ["old.txt"]
  assert es.main(argv + ["--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["model.stablehlo", "serving.json"]
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left behind
  line = capsys.readouterr().out.strip()
  assert line == f"{out}: stablehlo, input images uint8 [batchx17x17x3], outputs features"


@pytest.mark.parametrize("fmt", es.FORMATS)
def test_wrong_image_size_or_channels_is_refused(fmt, references, exported, savedmodels):
  if fmt == "onnx":
    _need_jax2onnx()
  good = references["dinov2_reg"].images[:2]  # [2, 28, 28, 3]
  bad = {"size": np.ascontiguousarray(good[:, :, 1:]), "channels": np.ascontiguousarray(good[..., :1])}
  folder = exported("dinov2_reg", fmt)
  if fmt == "stablehlo":
    import jax  # pylint: disable=g-import-not-at-top
    with open(os.path.join(folder, "model.stablehlo"), "rb") as f:
      program = jax.export.deserialize(bytearray(f.read()))
    call, error, message = program.call, ValueError, r"Shape mismatch .* expected \(batch, 28, 28, 3\)"
  elif fmt == "onnx":
    session = _onnx_session(folder)
    call = lambda x: session.run(None, {"images": x})
    error, message = Exception, "Got invalid dimensions for input: images"
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    serve = savedmodels["dinov2_reg"].signatures["serving_default"]
    call = lambda x: serve(images=tf.constant(x))
    error, message = tf.errors.InvalidArgumentError, r"images must be uint8 \[batch, 28, 28, 3\]"
  for what, x in bad.items():
    with pytest.raises(error, match=message):
      call(x)


def test_serving_json_names_the_path_of_an_open_source(tmp_path):
  """An open CheckpointSource is exported as its path would be: serving.json names the path, not the
  object's repr."""
  from vit_cls import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(ZOO, "timm_dinov2_reg")
  info = es.export(ckpt_lib.open_source(path), "stablehlo", str(tmp_path / "out"))
  assert info["checkpoint"] == path
  assert json.load(open(tmp_path / "out" / "serving.json"))["checkpoint"] == path
