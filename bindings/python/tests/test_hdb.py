"""The Python binding on the tiny SD fixture (run by scripts/test-bindings.sh)."""

import ctypes
import json
import os
import threading

import numpy as np
import pytest

import hdb
from hdb import _capi

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures")
TINY = os.path.join(FIXTURES, "tiny-sd")
ID1 = os.path.join(FIXTURES, "adapter", "id1.lidb.safetensors")
SMALL = dict(prompt="a photo of sks person", num_inference_steps=2, width=64, height=64, seed=7,
             sampler="ddim")


@pytest.fixture(scope="module")
def model():
    with hdb.Runtime(device="cpu", num_threads=2) as rt, hdb.Model(rt, TINY) as m:
        yield m


@pytest.mark.parametrize("name", ["Runtime", "Model", "Session", "Generate", "Predict", "Finetune",
                                  "AdapterLoad"])
def test_struct_layouts_match_the_library(name):
    # hdb writes struct_size = sizeof(struct) in C: a ctypes layout that differs is caught here.
    c_type = getattr(_capi, name + "Params")
    snake = {"Runtime": "runtime", "Model": "model", "Session": "session", "Generate": "generate",
             "Predict": "predict", "Finetune": "finetune", "AdapterLoad": "adapter_load"}[name]
    p = getattr(_capi.lib, f"hdb_{snake}_params_default")()
    assert p.struct_size == ctypes.sizeof(c_type)
    q = c_type()
    assert getattr(_capi.lib, f"hdb_{snake}_params_init")(ctypes.byref(q), ctypes.sizeof(q)) == 0
    # Field by field: padding bytes are unspecified.
    for field, _ in c_type._fields_:
        a, b = getattr(q, field), getattr(p, field)
        if field.startswith("progress") or field in ("latents", "prompt", "negative_prompt", "token",
                                                     "device", "tokenizer"):
            assert not a and not b, field  # NULL by default
        else:
            assert a == b, field


def test_version_and_statuses():
    assert hdb.abi_version() == _capi.HDB_ABI_VERSION
    for s in hdb.Status:
        assert _capi.lib.hdb_status_name(int(s)).decode() == "HDB_STATUS_" + s.name


def test_generate_pil_and_numpy(model):
    steps = []
    with hdb.Session(model) as s:
        images = s.generate(**SMALL, callback=lambda i, n, stage: steps.append((i, n, stage)))
        assert len(images) == 1 and images[0].size == (64, 64) and images[0].mode == "RGB"
        assert len(steps) >= 2 and all(stage for _, _, stage in steps)
        stages = []
        s.generate(**SMALL, progress_stages=True, callback=lambda i, n, st: stages.append((st, i, n)))
        assert [st for st, _, _ in stages] == ["build"] * 4 + ["text"] * 2 + ["denoise"] * 3 + ["decode"] * 2
        assert stages[-1] == ("decode", 1, 1), stages
        a = s.generate(**SMALL, output_type="np")
        assert a.shape == (1, 64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(np.asarray(images[0]), a[0]), "same seed, same image"
        with hdb.Adapter.load(model, ID1) as ad:
            s.set_adapters([ad], scales=[1.0])
        b = s.generate(**SMALL, output_type="np")
        assert not np.array_equal(a, b), "the identity changes the image"
        with open(ID1, "rb") as f:
            ad2 = hdb.Adapter.from_bytes(model, f.read())
        s.set_adapters([ad2], mode="runtime")
        s.set_sample_adapters([-1, 0])
        two = s.generate(**dict(SMALL, num_images_per_prompt=2), output_type="np")
        assert two.shape == (2, 64, 64, 3) and not np.array_equal(two[0], two[1])


def test_errors_name_what_failed(model):
    with pytest.raises(hdb.HdbError) as e:
        hdb.Model(model.runtime, "/nonexistent/hdb-py-model")
    assert e.value.status == hdb.Status.FILE_NOT_FOUND and "hdb-py-model" in e.value.message
    with hdb.Session(model) as s:
        with pytest.raises(hdb.HdbError) as e:
            s.generate(**dict(SMALL, width=63))
        assert e.value.status == hdb.Status.INVALID_ARGUMENT and "width" in e.value.message


def test_errors_from_many_threads(model):
    wrong = []

    def worker(t):
        for i in range(20):
            path = f"/nonexistent/hdb-py-{t}-{i}"
            try:
                hdb.Model(model.runtime, path)
                wrong.append((path, "no error"))
            except hdb.HdbError as e:
                if path not in e.message:
                    wrong.append((path, e.message))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_callback_exception_cancels_and_is_reraised(model):
    class Boom(Exception):
        pass

    def boom(i, n, stage):
        raise Boom("from the callback")

    with hdb.Session(model) as s:
        with pytest.raises(Boom):
            s.generate(**SMALL, callback=boom)
        with pytest.raises(hdb.HdbError) as e:
            s.generate(**dict(SMALL, num_inference_steps=20), callback=lambda *a: s.cancel())
        assert e.value.status == hdb.Status.CANCELLED
        s.generate(**SMALL)  # still usable


def test_unet_shapes(model):
    with hdb.Session(model) as s:
        x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
        ctx = np.zeros((1, 77, model.info()["cross_attention_dim"]), dtype=np.float32)
        y = s.unet(x, np.array([10.0], dtype=np.float32), ctx)
        assert y.shape == x.shape and np.isfinite(y).all() and not np.array_equal(x, y)


def test_log_callback_is_released(model):
    records = []
    hdb.set_log_callback(lambda level, target, msg: records.append((level, target)), "debug")
    hdb.Model(model.runtime, TINY).close()
    hdb.set_log_callback(None)
    assert records, "no log records"
    assert hdb._live_log_callbacks() == 0, "hdb still holds the callback"


def test_closed_objects_refuse_use(model):
    s = hdb.Session(model)
    s.close()
    with pytest.raises(hdb.HdbError) as e:
        s.generate(**SMALL)  # a closed handle is NULL: hdb refuses it by name
    assert e.value.status == hdb.Status.NULL_ARGUMENT and "session" in e.value.message


def test_describe_and_info(model):
    d = model.describe()
    assert isinstance(d, dict) and d
    assert model.info()["architecture"] == 1
    assert model.runtime.info() == {"device": "cpu", "device_index": 0, "num_threads": 2}
    stages = []
    hdb.Model(model.runtime, TINY, storage=1, callback=lambda d, n, s: stages.append(s)).close()
    assert stages and set(stages) == {"load"}


def test_identity_from_a_face(model, tmp_path):
    # The params layouts are right when hdb runs exactly the steps asked for.
    face = (np.arange(32 * 32 * 3) * 7 % 256).astype(np.uint8).reshape(32, 32, 3)
    net = hdb.Hypernet(model.runtime, os.path.join(FIXTURES, "hypernet", "tiny.hypernet.safetensors"))
    iters = []
    with net, net.predict(model, face, iterations=2, callback=lambda *a: iters.append(a)) as pred:
        assert len(iters) == 2
        losses = []
        kw = dict(steps=2, resolution=64, seed=1, callback=lambda step, n, loss: losses.append(loss))
        with hdb.finetune(model, face, **kw):
            assert len(losses) == 2 and np.isfinite(losses).all()
        from PIL import Image

        with net.personalize(model, Image.fromarray(face), **kw) as tuned:
            assert len(losses) == 4
            tuned.save(tmp_path / "me.safetensors")
        assert (tmp_path / "me.safetensors").stat().st_size > 0
        del pred


def test_model_from_bytes(model):
    path = os.path.join(FIXTURES, "tiny-sd-ldm.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    stages = []
    with hdb.Model(model.runtime, path) as disk, \
            hdb.Model.from_bytes(model.runtime, data, "tiny.safetensors", callback=lambda d, n, s: stages.append(s)) as mem:
        assert mem.info() == disk.info() and mem.info()["source_format"] == 2
        assert stages and set(stages) == {"load"}
        assert "tiny.safetensors" in json.dumps(mem.describe())
    with pytest.raises(hdb.HdbError) as e:
        hdb.Model.from_bytes(model.runtime, data[:1000], "cut.safetensors")
    assert e.value.status == hdb.Status.INVALID_FILE and "cut.safetensors" in e.value.message


def _with_extra_lora_keys(src, dst):
    """src (a kohya LoRA) plus a LoRA pair for a layer the model lacks, in safetensors form."""
    raw = open(src, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    end = len(data)
    for key, shape in (("lora_vae_conv_in.lora_down.weight", [2, 4]),
                       ("lora_vae_conv_in.lora_up.weight", [4, 2])):
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end + 32]}
        end += 32
    h = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data + bytes(64))


def test_adapter_load_allow_unmatched(model, tmp_path):
    path = tmp_path / "extra.safetensors"
    _with_extra_lora_keys(os.path.join(FIXTURES, "lora-layers", "style.kohya.safetensors"), path)
    with pytest.raises(hdb.HdbError) as e:
        hdb.Adapter.load(model, path)
    assert e.value.status == hdb.Status.ADAPTER_MISMATCH and "lora_vae_conv_in" in str(e.value)
    with hdb.Adapter.load(model, path, allow_unmatched=True) as a, hdb.Session(model) as s:
        s.set_adapters([a])
