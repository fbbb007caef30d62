#!/usr/bin/env python3
"""Writes the tiny checkpoint fixtures under tests/fixtures/pth/ for tests/checkpoint.rs.

Run once by hand with the reference venv (torch + safetensors):
    /work/refenv/venv/bin/python scripts/make_pth_fixtures.py

Outputs:
  mixed.pth / mixed.json      bf16, f16, f32 tensors, a view with a storage offset, a transposed
                              (non-contiguous) tensor, an int64 tensor; expected values in JSON.
  short_storage.pth           like a small state dict, but one storage entry is cut short.
  meta_mismatch/              2 MP shards whose norm.weight shapes differ.
  meta2/                      params.json + consolidated.00.pth + consolidated.01.pth (MP=2).
  meta1.json                  expected values of a few tensors of the unsharded model.
  hf/                         config.json + model.safetensors of the same model, HF names and
                              HF's rotate-half q/k row order.
  hf_sharded/                 the same as 2 safetensors shards + model.safetensors.index.json.
"""

import io
import json
import os
import zipfile
from collections import OrderedDict

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "pth")


def values(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def mixed():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    big = torch.randn(20, generator=g).to(torch.bfloat16)
    sd = OrderedDict()
    sd["a.bf16"] = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    sd["b.f16"] = torch.randn(2, 3, 2, generator=g).to(torch.float16)
    sd["c.f32"] = torch.randn(7, generator=g)
    # A view into the middle of a larger storage: storage_offset 5, shape [3, 4].
    sd["d.offset"] = big[5:17].view(3, 4)
    # Transposed: strides (1, 6) over a [4, 6] f32 storage.
    sd["e.transposed"] = base.t()
    # Transposed slice with an offset as well: strides (1, 4), offset 1.
    sd["f.tslice"] = big[1:13].view(3, 4).t()[1:3]
    sd["g.int64"] = torch.arange(5, dtype=torch.int64)
    sd["h.scalar"] = torch.tensor(2.5, dtype=torch.float32)
    assert sd["d.offset"].storage_offset() == 5
    assert not sd["e.transposed"].is_contiguous()
    torch.save(sd, os.path.join(OUT, "mixed.pth"))

    expected = {}
    for k, t in sd.items():
        if t.dtype == torch.int64:
            continue
        expected[k] = {
            "dtype": {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[t.dtype],
            "shape": list(t.shape),
            "values": values(t),
        }
    with open(os.path.join(OUT, "mixed.json"), "w") as f:
        json.dump(expected, f, indent=1)


def short_storage():
    sd = {"x": torch.arange(8, dtype=torch.float32), "y": torch.ones(4, dtype=torch.float16)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    src = zipfile.ZipFile(buf)
    with zipfile.ZipFile(os.path.join(OUT, "short_storage.pth"), "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            # The storage of "x" is data/0: keep only 3 of its 8 floats.
            if info.filename.endswith("/data/0"):
                data = data[:12]
            dst.writestr(info.filename, data)


# A tiny Llama: dim 16, 2 layers, 4 heads of 4, 2 kv heads, ffn 24, vocab 10; MP=2.
DIM, LAYERS, HEADS, KV, FFN, VOCAB, MP = 16, 2, 4, 2, 24, 10, 2
HD = DIM // HEADS


def meta_model():
    g = torch.Generator().manual_seed(2)

    def r(*s):
        return torch.randn(*s, generator=g).to(torch.bfloat16)

    m = OrderedDict()
    m["tok_embeddings.weight"] = r(VOCAB, DIM)
    for layer in range(LAYERS):
        p = f"layers.{layer}."
        m[p + "attention.wq.weight"] = r(HEADS * HD, DIM)
        m[p + "attention.wk.weight"] = r(KV * HD, DIM)
        m[p + "attention.wv.weight"] = r(KV * HD, DIM)
        m[p + "attention.wo.weight"] = r(DIM, HEADS * HD)
        m[p + "feed_forward.w1.weight"] = r(FFN, DIM)
        m[p + "feed_forward.w2.weight"] = r(DIM, FFN)
        m[p + "feed_forward.w3.weight"] = r(FFN, DIM)
        m[p + "attention_norm.weight"] = r(DIM)
        m[p + "ffn_norm.weight"] = r(DIM)
    m["norm.weight"] = r(DIM)
    m["output.weight"] = r(VOCAB, DIM)
    return m


def split_dim(name):
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name in ("output.weight", "tok_embeddings.weight"):
        return 0
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


def write_meta(m):
    d = os.path.join(OUT, "meta2")
    os.makedirs(d, exist_ok=True)
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV,
              "vocab_size": VOCAB, "norm_eps": 1e-5, "rope_theta": 500000.0}
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump(params, f)
    for rank in range(MP):
        shard = {}
        for k, t in m.items():
            sd = split_dim(k)
            shard[k] = t.clone() if sd is None else t.chunk(MP, dim=sd)[rank].clone()
        # Old Meta checkpoints carry rope.freqs; the reader skips it.
        shard["rope.freqs"] = torch.ones(HD // 2, dtype=torch.bfloat16)
        torch.save(shard, os.path.join(d, f"consolidated.{rank:02d}.pth"))
    # Expected values of a few tensors covering each combine rule (kept small).
    keep = ["layers.1.attention.wk.weight", "layers.1.attention.wo.weight", "norm.weight",
            "output.weight"]
    with open(os.path.join(OUT, "meta1.json"), "w") as f:
        json.dump({k: {"shape": list(m[k].shape), "values": values(m[k])} for k in keep}, f)


def hf_permute(w, n_heads):
    # The transformers conversion script: interleaved pairs -> rotate-half halves.
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_tensors(m):
    t = {"model.embed_tokens.weight": m["tok_embeddings.weight"],
         "model.norm.weight": m["norm.weight"],
         "lm_head.weight": m["output.weight"]}
    for layer in range(LAYERS):
        p, h = f"layers.{layer}.", f"model.layers.{layer}."
        t[h + "self_attn.q_proj.weight"] = hf_permute(m[p + "attention.wq.weight"], HEADS)
        t[h + "self_attn.k_proj.weight"] = hf_permute(m[p + "attention.wk.weight"], KV)
        t[h + "self_attn.v_proj.weight"] = m[p + "attention.wv.weight"]
        t[h + "self_attn.o_proj.weight"] = m[p + "attention.wo.weight"]
        t[h + "mlp.gate_proj.weight"] = m[p + "feed_forward.w1.weight"]
        t[h + "mlp.down_proj.weight"] = m[p + "feed_forward.w2.weight"]
        t[h + "mlp.up_proj.weight"] = m[p + "feed_forward.w3.weight"]
        t[h + "input_layernorm.weight"] = m[p + "attention_norm.weight"]
        t[h + "post_attention_layernorm.weight"] = m[p + "ffn_norm.weight"]
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(HD // 2, dtype=torch.float32)
    return {k: v.contiguous() for k, v in t.items()}


def write_hf(m):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": DIM,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "intermediate_size": FFN, "vocab_size": VOCAB,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}
    t = hf_tensors(m)
    d = os.path.join(OUT, "hf")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    d = os.path.join(OUT, "hf_sharded")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(t)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: t[k] for k in part}, os.path.join(d, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def mismatch():
    # Two MP shards whose replicated norm disagrees in shape.
    d = os.path.join(OUT, "meta_mismatch")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump({"dim": 4}, f)
    for rank, n in enumerate([4, 5]):
        shard = {"norm.weight": torch.ones(n, dtype=torch.bfloat16),
                 "output.weight": torch.zeros(2, 4, dtype=torch.bfloat16)}
        torch.save(shard, os.path.join(d, f"consolidated.{rank:02d}.pth"))


def main():
    os.makedirs(OUT, exist_ok=True)
    mixed()
    short_storage()
    mismatch()
    m = meta_model()
    write_meta(m)
    write_hf(m)


if __name__ == "__main__":
    main()
