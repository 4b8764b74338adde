"""Builds hdb's LiDB adapter fixtures: the v1 random orthonormal basis of every adapted layer of the
tiny SD 1.5-shaped UNet, two random identities as LiDB files, their export to kohya and PEFT LoRA
files, and diffusers + peft reference UNet outputs with those LoRAs loaded.

Makes (relative to the repository root; all tensors f32):
  tests/fixtures/adapter/basis.safetensors
        for each of the 128 adapted UNet layers K of tests/fixtures/tiny-sd (to_q/to_k/to_v/to_out.0 of
        attn1 and attn2 in all 16 transformer blocks), a=3, b=2, basis_seed=1234567890123456789:
        `K.d_aux` [a, in], `K.u_aux` [out, b], from tools/lidb.py basis();
        plus two SD 1.5-sized synthetic layers at a=100, b=50, same seed:
        `unet.sd15.attn1.to_q` (in=out=320) and `unet.sd15.attn2.to_k` (in=768, out=320).
        Metadata: format=hdb-lidb-basis, version=1, a, b, basis_seed, layers (the count of tiny layers),
        synthetic="<K1>,<K2>" and for each synthetic K: `K.in`, `K.out`, `K.a`, `K.b`, `K.basis_seed`;
        probe_key (the first tiny layer in sorted key order), probe_fnv1a64 = fnv1a64(probe_key),
        probe_seed = seed_K, probe_u64 = the first 4 outputs of its splitmix64 stream (comma separated,
        decimal), probe_normals = the first 4 normals of that stream (comma separated, Python repr).
  tests/fixtures/adapter/id1.lidb.safetensors        LiDB v1, rank 1, all 128 layers, alpha 0.8, base tiny-sd
  tests/fixtures/adapter/id2.lidb.safetensors        LiDB v1, rank 2, all 128 layers, alpha 0.8, base tiny-sd
  tests/fixtures/adapter/id1-half.lidb.safetensors   id1 restricted to the 64 attn1 layers
        D_train, U_train ~ N(0, TRAIN_STD^2), numpy default_rng(seed) in sorted key order, D_train
        then U_train per layer.
  tests/fixtures/adapter/id1.kohya.safetensors       id1 as kohya LoRA: lora_unet_<path, '.'->'_'>.lora_down.weight
                                                     [r,in], .lora_up.weight [out,r], .alpha = r (scale 1)
  tests/fixtures/adapter/id1.peft.safetensors        id1 as diffusers/PEFT LoRA: unet.<path>.lora_A.weight [r,in],
  tests/fixtures/adapter/id2.peft.safetensors        .lora_B.weight [out,r] (no alphas: lora_alpha = r, scale 1)
        Factors from lidb.lora_factors: down = D_train.D_aux, up = alpha * U_aux.U_train.
  tests/fixtures/adapter/<case>.out.safetensors      `out` [2,4,16,16]: UNet2DConditionModel(tiny-sd unet) with
        LoRA loaded by diffusers (StableDiffusionPipeline.load_lora_weights, i.e. lora_state_dict +
        unet.load_lora_adapter(prefix="unet") on peft) on the inputs of tests/fixtures/unet/tiny-sd.in.safetensors:
          id1               id1.peft at weight 1.0
          id1-kohya         id1.kohya at weight 1.0 (diffusers' kohya conversion); must equal id1 within 1e-5
          id1x0.7-id2x0.5   id1.peft and id2.peft active together, weights 0.7 and 0.5
          per-sample        sample 0 with id1 (1.0), sample 1 with id2 (1.0): two batch-1 runs, concatenated
          id1-half          id1-half exported to PEFT in memory, weight 1.0

Checks (the tool exits non-zero on any failure):
  * splitmix64 / fnv1a64 against published test vectors; the basis is orthonormal; the f32 basis is
    unchanged under reasonable implementation variants (BLAS dot, multiply by 1/norm), so a Rust
    port that sums or normalizes slightly differently still matches bit for bit (reported);
  * LiDB files round-trip through lidb.load_lidb;
  * with LoRA disabled, the UNet reproduces tests/fixtures/unet/tiny-sd.out.safetensors exactly;
  * the kohya and PEFT exports give the same output within 1e-5 relative;
  * for all 128 layers, the lora_B @ lora_A * scaling diffusers loaded equals lidb.delta_weight
    (1e-6 relative), and after unet.fuse_lora() every fused weight equals W_base + dW (1e-6 relative
    to max|W|), and the fused UNet's output equals the unfused one (1e-5 relative).

Everything runs on one CPU thread with fixed seeds: running the tool twice writes identical bytes.
Nothing is downloaded. CI never runs this tool; the fixtures it writes are committed.

Run from the repository root with the reference venv (../shared/setup-reference-venv.sh), after
tools/make_io_fixtures.py and tools/make_unet_fixtures.py:
    /tmp/hdb-ref-venv/bin/python tools/make_adapter_fixtures.py [--out tests/fixtures]
"""

import argparse
import math
import os
import re
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lidb  # noqa: E402
from make_op_fixtures import save_sorted  # noqa: E402  (deterministic header order)
from make_unet_fixtures import run  # noqa: E402  (the UNet call the unet fixtures use)

BASIS_SEED = 1234567890123456789
A, B = 3, 2
ALPHA = 0.8
BASE = "tiny-sd"
TRAIN_STD = 0.8
IDENTITIES = {"id1": (1, 20240701), "id2": (2, 20240702)}  # name: (rank, numpy seed)
SD15 = [("unet.sd15.attn1.to_q", 320, 320), ("unet.sd15.attn2.to_k", 768, 320)]
SD15_A, SD15_B = 100, 50
GENERATOR = f"tools/make_adapter_fixtures.py torch {torch.__version__}"

UNET_LAYER_RE = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def fail(msg):
    sys.exit(f"FAIL {msg}")


def adapted_layers(unet):
    """{K: (in, out)} for every adapted UNet projection, K = 'unet.' + module path."""
    out = {}
    for name, m in unet.named_modules():
        if UNET_LAYER_RE.search(name):
            assert isinstance(m, torch.nn.Linear), name
            out["unet." + name] = (m.in_features, m.out_features)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- basis

def check_rng():
    r = lidb.SplitMix64(0)
    got = [r.next() for _ in range(3)]
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    if got != want:
        fail(f"splitmix64(0) = {[hex(g) for g in got]}, want {[hex(w) for w in want]}")
    for s, want in (("", 0xCBF29CE484222325), ("a", 0xAF63DC4C8601EC8C), ("foobar", 0x85944171F73967E8)):
        if lidb.fnv1a64(s) != want:
            fail(f"fnv1a64({s!r}) = {lidb.fnv1a64(s):#x}, want {want:#x}")
    print("ok   splitmix64 and fnv1a64 match their published test vectors")


def variant_basis(key, n_in, n_out, a, b, seed):
    """The same basis with BLAS dots and multiply-by-reciprocal normalization: how far a port that
    differs in those two choices lands."""
    def mgs(m):
        for i in range(m.shape[0]):
            for j in range(i):
                m[i] -= np.dot(m[i], m[j]) * m[j]
            m[i] *= 1.0 / math.sqrt(np.dot(m[i], m[i]))

    z = lidb.normals(lidb.layer_stream(seed, key), a * n_in + b * n_out)
    d, u = z[: a * n_in].reshape(a, n_in).copy(), z[a * n_in:].reshape(b, n_out).copy()
    for _ in range(2):
        mgs(d)
        mgs(u)
    return d.astype(np.float32), np.ascontiguousarray(u.T).astype(np.float32)


def make_basis(layers, path):
    tensors, worst = {}, 0.0
    for key, (n_in, n_out) in layers.items():
        d_aux, u_aux = lidb.basis(key, n_in, n_out, A, B, BASIS_SEED)
        tensors[key + ".d_aux"], tensors[key + ".u_aux"] = d_aux, u_aux
    meta = {"format": "hdb-lidb-basis", "version": "1", "a": str(A), "b": str(B), "basis_seed": str(BASIS_SEED),
            "layers": str(len(layers)), "generator": GENERATOR}
    for key, n_in, n_out in SD15:
        d_aux, u_aux = lidb.basis(key, n_in, n_out, SD15_A, SD15_B, BASIS_SEED)
        tensors[key + ".d_aux"], tensors[key + ".u_aux"] = d_aux, u_aux
        meta.update({f"{key}.in": str(n_in), f"{key}.out": str(n_out), f"{key}.a": str(SD15_A),
                     f"{key}.b": str(SD15_B), f"{key}.basis_seed": str(BASIS_SEED)})
    meta["synthetic"] = ",".join(k for k, _, _ in SD15)
    probe = next(iter(layers))
    stream = lidb.layer_stream(BASIS_SEED, probe)
    meta.update({"probe_key": probe, "probe_fnv1a64": str(lidb.fnv1a64(probe)),
                 "probe_seed": str(lidb.layer_seed(BASIS_SEED, probe)),
                 "probe_u64": ",".join(str(stream.next()) for _ in range(4)),
                 "probe_normals": ",".join(repr(float(x)) for x in
                                           lidb.normals(lidb.layer_stream(BASIS_SEED, probe), 4))})

    # Orthonormality (f32 values, checked in f64) and robustness to implementation variants.
    shapes = dict(layers)
    shapes.update({k: (i, o) for k, i, o in SD15})
    n_diff = n_all = 0
    for key, (n_in, n_out) in shapes.items():
        d, u = tensors[key + ".d_aux"].astype(np.float64), tensors[key + ".u_aux"].astype(np.float64)
        worst = max(worst, np.abs(d @ d.T - np.eye(d.shape[0])).max(), np.abs(u.T @ u - np.eye(u.shape[1])).max())
        a, b = d.shape[0], u.shape[1]
        vd, vu = variant_basis(key, n_in, n_out, a, b, BASIS_SEED)
        n_diff += int((vd != tensors[key + ".d_aux"]).sum() + (vu != tensors[key + ".u_aux"]).sum())
        n_all += vd.size + vu.size
    if worst > 1e-6:
        fail(f"basis not orthonormal: max |G - I| = {worst:.3g}")
    print(f"ok   basis: {len(layers)} tiny layers (a={A}, b={B}) + {len(SD15)} SD 1.5-sized (a={SD15_A}, "
          f"b={SD15_B}); max |G - I| = {worst:.3g} (f32 values)")
    print(f"     f32 elements that change with BLAS dots + multiply-by-1/norm: {n_diff} of {n_all}")
    print(f"     probe {probe}: seed_K={meta['probe_seed']} u64={meta['probe_u64']}")
    lidb.save_tensors(tensors, path, metadata=meta)
    back = load_file(path)
    assert set(back) == set(tensors) and all(np.array_equal(back[k].numpy(), v) for k, v in tensors.items())
    return tensors


# ---------------------------------------------------------------- identities and exports

def make_identity(layers, rank, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for key in layers:  # sorted
        d = (rng.standard_normal((rank, A)) * TRAIN_STD).astype(np.float32)
        u = (rng.standard_normal((B, rank)) * TRAIN_STD).astype(np.float32)
        out[key] = (d, u)
    return lidb.LidbAdapter(out, rank, A, B, BASIS_SEED, ALPHA, BASE)


def write_lidb(adapter, path):
    lidb.save_lidb(adapter, path)
    back = lidb.load_lidb(path)
    ok = (back.metadata() == adapter.metadata() and set(back.layers) == set(adapter.layers)
          and all(np.array_equal(back.layers[k][i], adapter.layers[k][i]) for k in adapter.layers for i in (0, 1)))
    if not ok:
        fail(f"{path} does not round-trip through lidb.load_lidb")
    print(f"ok   {os.path.basename(path)}: rank {adapter.rank}, {len(adapter.layers)} layers, round-trips; "
          f"metadata {adapter.metadata()}")


def export_meta(name, kind):
    return {"format": "pt", "generator": GENERATOR,
            "source": f"{name}.lidb.safetensors exported by lidb.lora_factors ({kind}, alpha folded into up, scale 1)"}


# ---------------------------------------------------------------- references

def load_pipe(tiny):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True)
    assert next(pipe.unet.parameters()).dtype == torch.float32
    pipe.unet.eval()
    return pipe


def rel(x, ref):
    return (x - ref).abs().max().item() / ref.abs().max().item()


def save_out(out_dir, case, out, base, note):
    if not bool(torch.isfinite(out).all()):
        fail(f"{case}: non-finite output")
    save_sorted({"out": out}, os.path.join(out_dir, f"{case}.out.safetensors"),
                metadata={"case": case, "generator": GENERATOR, "adapters": note})
    m, mb = out.abs().max().item(), base.abs().max().item()
    print(f"ok   {case}.out: max|out|={m:.4f} (base {mb:.4f}, {100 * (m - mb) / mb:+.1f}%), "
          f"max|out-base|/max|base|={100 * rel(out, base):.1f}%  [{note}]")


def check_merged(tiny, peft_path, adapter, shapes, want_out, inp):
    """Load the PEFT export into a bare UNet with unet.load_lora_adapter, compare what peft holds
    and what fuse_lora merges with tools/lidb.py's dW."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet", local_files_only=True).eval()
    base_w = {k: m.weight.detach().clone() for k, m in unet.named_modules()
              if ("unet." + k) in shapes and isinstance(m, torch.nn.Linear)}
    unet.load_lora_adapter(peft_path, prefix="unet", adapter_name="x")
    mods = dict(unet.named_modules())
    worst_d = 0.0
    dws = {}
    for key in sorted(adapter.layers):
        d_train, u_train = adapter.layers[key]
        n_in, n_out = shapes[key]
        d_aux, u_aux = lidb.basis(key, n_in, n_out, adapter.a, adapter.b, adapter.basis_seed)
        dw = lidb.delta_weight(d_train, u_train, d_aux, u_aux, adapter.alpha)
        dws[key] = dw
        m = mods[key[len("unet."):]]
        got = (m.lora_B["x"].weight.detach().double() @ m.lora_A["x"].weight.detach().double()).numpy() * m.scaling["x"]
        worst_d = max(worst_d, np.abs(got - dw).max() / np.abs(dw).max())
    if worst_d > 1e-6:
        fail(f"peft lora_B @ lora_A * scaling differs from lidb dW: {worst_d:.3g} relative")
    unet.fuse_lora(lora_scale=1.0, adapter_names=["x"])
    worst_w = worst_wd = 0.0
    for key, dw in dws.items():
        m = mods[key[len("unet."):]]
        w0 = base_w[key[len("unet."):]].double().numpy()
        fused = m.base_layer.weight.detach().double().numpy()
        want = w0 + dw
        worst_w = max(worst_w, np.abs(fused - want).max() / np.abs(w0).max())
        worst_wd = max(worst_wd, np.abs(fused - want).max() / np.abs(dw).max())
    if worst_w > 1e-6:
        fail(f"fused weights differ from W + dW: {worst_w:.3g} relative to max|W|")
    with torch.no_grad():  # merged layers run base_layer only: the adapter is not added twice
        fused_out = run(unet, inp)
    r = rel(fused_out, want_out)
    if r > 1e-5:
        fail(f"fused UNet output differs from the unfused reference: {r:.3g}")
    print(f"ok   merged-weight cross-check, {len(dws)} layers: max|BA*scaling - dW|/max|dW| = {worst_d:.3g}; "
          f"fuse_lora: max|W_fused - (W + dW)| = {worst_w:.3g} of max|W| ({worst_wd:.3g} of max|dW|); "
          f"fused output vs LoRA output {r:.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tiny = os.path.join(args.out, "tiny-sd")
    in_path = os.path.join(args.out, "unet", "tiny-sd.in.safetensors")
    base_path = os.path.join(args.out, "unet", "tiny-sd.out.safetensors")
    for p in (tiny, in_path, base_path):
        if not os.path.exists(p):
            sys.exit(f"{p} is missing: run tools/make_io_fixtures.py and tools/make_unet_fixtures.py first")
    out_dir = os.path.join(args.out, "adapter")
    os.makedirs(out_dir, exist_ok=True)

    check_rng()
    pipe = load_pipe(tiny)
    unet = pipe.unet
    layers = adapted_layers(unet)
    if len(layers) != 128:
        fail(f"expected 128 adapted layers (16 transformer blocks x 8), found {len(layers)}")
    sizes = sorted(set(layers.values()))
    print(f"ok   {len(layers)} adapted layers; (in, out) in {sizes}")
    make_basis(layers, os.path.join(out_dir, "basis.safetensors"))

    ids = {name: make_identity(layers, r, seed) for name, (r, seed) in IDENTITIES.items()}
    ids["id1-half"] = ids["id1"].subset(lambda k: ".attn1." in k)
    assert len(ids["id1-half"].layers) == 64
    for name, ad in ids.items():
        write_lidb(ad, os.path.join(out_dir, f"{name}.lidb.safetensors"))
    factors = {name: ad.factors(layers) for name, ad in ids.items()}
    kohya_path = os.path.join(out_dir, "id1.kohya.safetensors")
    lidb.save_tensors(lidb.to_kohya(factors["id1"]), kohya_path, metadata=export_meta("id1", "kohya"))
    peft_paths = {}
    for name in ("id1", "id2"):
        peft_paths[name] = os.path.join(out_dir, f"{name}.peft.safetensors")
        lidb.save_tensors(lidb.to_peft(factors[name]), peft_paths[name], metadata=export_meta(name, "peft"))
    half_sd = {k: torch.from_numpy(v) for k, v in lidb.to_peft(factors["id1-half"]).items()}

    # References.
    inp = load_file(in_path)
    base = load_file(base_path)["out"]
    with torch.no_grad():
        got = run(unet, inp)
    if not torch.equal(got, base):
        fail(f"tiny-sd UNet does not reproduce {base_path}: {rel(got, base):.3g}")
    pipe.load_lora_weights(peft_paths["id1"], adapter_name="id1")
    pipe.load_lora_weights(peft_paths["id2"], adapter_name="id2")
    pipe.load_lora_weights(kohya_path, adapter_name="id1k")
    pipe.load_lora_weights(half_sd, adapter_name="id1h")
    n_lora = sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A"))
    if n_lora != 128:
        fail(f"diffusers wrapped {n_lora} modules with LoRA, want 128")

    def active(names, weights):
        unet.set_adapters(names, weights)
        with torch.no_grad():
            return run(unet, inp)

    outs = {}
    outs["id1"] = active(["id1"], [1.0])
    outs["id1-kohya"] = active(["id1k"], [1.0])
    r = rel(outs["id1-kohya"], outs["id1"])
    if r > 1e-5:
        fail(f"kohya and PEFT exports of id1 differ: {r:.3g}")
    print(f"ok   id1.kohya and id1.peft give the same UNet output (max diff / max|out| = {r:.3g})")
    outs["id1x0.7-id2x0.5"] = active(["id1", "id2"], [0.7, 0.5])
    per = []
    for i, name in enumerate(("id1", "id2")):
        unet.set_adapters([name], [1.0])
        with torch.no_grad():
            per.append(run(unet, {k: v[i:i + 1] for k, v in inp.items()}))
    outs["per-sample"] = torch.cat(per)
    outs["id1-half"] = active(["id1h"], [1.0])
    zero = active(["id1", "id2"], [0.0, 0.0])
    unet.disable_lora()
    with torch.no_grad():
        off = run(unet, inp)
    unet.enable_lora()
    for what, x in (("disable_lora()", off), ("weights 0", zero)):
        if not torch.equal(x, base):
            fail(f"with {what} the output differs from tiny-sd.out: {rel(x, base):.3g}")
    print("ok   with disable_lora() and with adapter weights 0 the output equals unet/tiny-sd.out exactly")
    notes = {"id1": "id1.peft x1.0", "id1-kohya": "id1.kohya x1.0", "id1x0.7-id2x0.5": "id1.peft x0.7 + id2.peft x0.5",
             "per-sample": "sample 0: id1.peft x1.0; sample 1: id2.peft x1.0 (two batch-1 runs)",
             "id1-half": "id1-half (attn1 layers of id1) as PEFT x1.0"}
    for case, out in outs.items():
        save_out(out_dir, case, out, base, notes[case])
    # The per-sample halves match the batch-2 single-adapter runs.
    id2_out = active(["id2"], [1.0])
    print(f"     per-sample vs batch-2 runs: sample 0 {rel(outs['per-sample'][0], outs['id1'][0]):.3g}, "
          f"sample 1 {rel(outs['per-sample'][1], id2_out[1]):.3g}")

    check_merged(tiny, peft_paths["id1"], ids["id1"], layers, outs["id1"], inp)

    total = 0
    for n in sorted(os.listdir(out_dir)):
        size = os.path.getsize(os.path.join(out_dir, n))
        total += size
        print(f"{size:>9}  adapter/{n}")
    print(f"{total:>9}  adapter/ total")


if __name__ == "__main__":
    main()
