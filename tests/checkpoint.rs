//! Checkpoint readers against fixtures written by scripts/make_pth_fixtures.py, and model configs
//! (params.json, config.json in both transformers layouts) against tests/fixtures/models.

mod common;

use herd::checkpoint::{
    detect, open, Bytes, CheckpointError, DType, HfSource, Layout, MetaSource, PthFile, QkHeads,
    Slice, SyntheticSource, Tensor, TensorSource,
};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth")
}

const HEADS: QkHeads = QkHeads {
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 4,
};

fn json(name: &str) -> serde_json::Value {
    let text = std::fs::read(fixtures().join(name)).unwrap();
    serde_json::from_slice(&text).unwrap()
}

fn expected(v: &serde_json::Value) -> (Vec<usize>, Vec<f32>) {
    let shape = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let vals = v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (shape, vals)
}

fn is_mapped(t: &Tensor) -> bool {
    matches!(t.bytes, Bytes::Mapped { .. })
}

/// Elements of a row-major `shape` tensor whose index along `s.dim` is inside the slice.
fn slice_ref(full: &[f32], shape: &[usize], s: Slice) -> Vec<f32> {
    let inner: usize = shape[s.dim + 1..].iter().product();
    let n = shape[s.dim];
    full.iter()
        .enumerate()
        .filter(|(i, _)| {
            let k = (i / inner) % n;
            k >= s.start && k < s.start + s.len
        })
        .map(|(_, &x)| x)
        .collect()
}

fn msg(e: CheckpointError) -> String {
    e.to_string()
}

#[test]
fn pth_values_dtypes_views() {
    let path = fixtures().join("mixed.pth");
    let f = PthFile::open(&path).unwrap();
    let exp = json("mixed.json");
    for (name, v) in exp.as_object().unwrap() {
        let t = f.load(name, None).unwrap();
        let (shape, vals) = expected(v);
        let dt = match v["dtype"].as_str().unwrap() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            _ => DType::F32,
        };
        assert_eq!(t.dtype, dt, "{name}");
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.to_f32_vec(), vals, "{name}");
        assert_eq!(f.shape(name).unwrap(), shape);
    }
    // Offset views of contiguous data stay in the map; transposed ones are gathered.
    assert!(is_mapped(&f.load("d.offset", None).unwrap()));
    assert!(is_mapped(&f.load("a.bf16", None).unwrap()));
    assert!(!is_mapped(&f.load("e.transposed", None).unwrap()));
    assert!(!is_mapped(&f.load("f.tslice", None).unwrap()));

    // Slices of a file tensor, both contiguous and not.
    let (shape, full) = expected(&exp["e.transposed"]);
    for s in [
        Slice {
            dim: 0,
            start: 1,
            len: 2,
        },
        Slice {
            dim: 1,
            start: 1,
            len: 3,
        },
    ] {
        let t = f.load("e.transposed", Some(s)).unwrap();
        assert_eq!(t.to_f32_vec(), slice_ref(&full, &shape, s));
    }
    let (shape, full) = expected(&exp["a.bf16"]);
    let s = Slice {
        dim: 0,
        start: 1,
        len: 2,
    };
    let t = f.load("a.bf16", Some(s)).unwrap();
    assert!(is_mapped(&t));
    assert_eq!(t.to_f32_vec(), slice_ref(&full, &shape, s));
    let e = msg(f
        .load(
            "a.bf16",
            Some(Slice {
                dim: 1,
                start: 4,
                len: 2,
            }),
        )
        .unwrap_err());
    assert!(e.contains("a.bf16") && e.contains("outside"), "{e}");
}

#[test]
fn pth_int64_rejected_but_others_load() {
    let path = fixtures().join("mixed.pth");
    let f = PthFile::open(&path).unwrap();
    assert!(f.names().contains(&"g.int64".to_string()));
    assert_eq!(f.shape("g.int64").unwrap(), vec![5]);
    let e = f.load("g.int64", None).unwrap_err();
    assert!(matches!(e, CheckpointError::Tensor { .. }));
    let e = msg(e);
    assert!(
        e.contains("int64") && e.contains("g.int64") && e.contains("mixed.pth"),
        "{e}"
    );
    assert!(f.load("c.f32", None).is_ok());
}

#[test]
fn pth_short_storage_names_file_and_tensor() {
    let f = PthFile::open(&fixtures().join("short_storage.pth")).unwrap();
    let e = msg(f.load("x", None).unwrap_err());
    assert!(
        e.contains("short_storage.pth") && e.contains("'x'") && e.contains("truncated"),
        "{e}"
    );
    assert_eq!(f.load("y", None).unwrap().to_f32_vec(), vec![1.0; 4]);
}

#[test]
fn pth_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("mixed.pth")).unwrap();
    for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join("cut.pth");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match PthFile::open(&p) {
            Err(e @ (CheckpointError::File { .. } | CheckpointError::Io { .. })) => {
                assert!(e.to_string().contains("cut.pth"), "{e}")
            }
            Err(e) => panic!("unexpected error kind: {e}"),
            Ok(_) => panic!("truncated file at {cut} opened"),
        }
    }
}

#[test]
fn pth_bad_pickle_global_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixtures().join("mixed.pth")).unwrap();
    let pat = b"collections\nOrderedDict";
    let at = bytes.windows(pat.len()).position(|w| w == pat).unwrap();
    // Same length, so the (stored, unchecked-CRC) zip stays readable.
    bytes[at..at + pat.len()].copy_from_slice(b"subprocess\nPopenXXXXXXX");
    let p = dir.path().join("evil.pth");
    std::fs::write(&p, &bytes).unwrap();
    let e = msg(PthFile::open(&p).err().unwrap());
    assert!(
        e.contains("evil.pth") && e.contains("subprocess.PopenXXXXXXX"),
        "{e}"
    );
}

#[test]
fn detect_layouts() {
    match detect(&fixtures().join("meta2")).unwrap() {
        Layout::Meta { params, shards } => {
            assert!(params.ends_with("params.json"));
            let n: Vec<_> = shards.iter().map(|p| p.file_name().unwrap()).collect();
            assert_eq!(n, ["consolidated.00.pth", "consolidated.01.pth"]);
        }
        l => panic!("{l:?}"),
    }
    match detect(&fixtures().join("hf_sharded")).unwrap() {
        Layout::Hf { config, files } => {
            assert!(config.ends_with("config.json"));
            assert_eq!(files.len(), 2);
            assert!(files[0].ends_with("model-00001-of-00002.safetensors"));
        }
        l => panic!("{l:?}"),
    }
    assert!(matches!(
        detect(&fixtures().join("hf")).unwrap(),
        Layout::Hf { .. }
    ));
}

#[test]
fn empty_dir_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let e = open(dir.path(), HEADS).err().unwrap();
    assert!(matches!(e, CheckpointError::Layout(_)));
    let e = msg(e);
    let d = dir.path().display().to_string();
    assert!(
        e.contains(&d)
            && e.contains("notes.txt")
            && e.contains("params.json")
            && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn shard_gap_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("meta2");
    std::fs::copy(src.join("params.json"), dir.path().join("params.json")).unwrap();
    std::fs::copy(
        src.join("consolidated.00.pth"),
        dir.path().join("consolidated.00.pth"),
    )
    .unwrap();
    std::fs::copy(
        src.join("consolidated.01.pth"),
        dir.path().join("consolidated.02.pth"),
    )
    .unwrap();
    let e = msg(detect(dir.path()).unwrap_err());
    assert!(e.contains("shard 1 is missing"), "{e}");

    // AIME merged names work the same way and must match their GPU count.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("params.json"), dir.path().join("params.json")).unwrap();
    for r in 0..2 {
        std::fs::copy(
            src.join(format!("consolidated.0{r}.pth")),
            dir.path().join(format!("merged.2GPUs.0{r}.pth")),
        )
        .unwrap();
    }
    let m = open(dir.path(), HEADS).unwrap();
    assert!(m.describe().contains("MP=2"), "{}", m.describe());
}

#[test]
fn meta_mp_merge() {
    let m = open(&fixtures().join("meta2"), HEADS).unwrap();
    assert!(m.describe().starts_with("Meta MP=2"), "{}", m.describe());
    let names = m.names();
    assert_eq!(names.len(), 1 + 2 * 9 + 2);
    assert!(!names.contains(&"rope.freqs".to_string()));
    assert_eq!(m.shape("tok_embeddings.weight").unwrap(), vec![10, 16]);
    assert_eq!(
        m.shape("layers.0.attention.wq.weight").unwrap(),
        vec![16, 16]
    );
    assert_eq!(
        m.shape("layers.0.feed_forward.w2.weight").unwrap(),
        vec![16, 24]
    );
    assert_eq!(m.shape("layers.0.ffn_norm.weight").unwrap(), vec![16]);

    let exp = json("meta1.json");
    for (name, v) in exp.as_object().unwrap() {
        let (shape, full) = expected(v);
        let t = m.load(name, None).unwrap();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.to_f32_vec(), full, "{name}");
        // Every slice along every dim equals the same part of the full tensor.
        for dim in 0..shape.len() {
            for start in 0..shape[dim] {
                for len in [0, 1, 3, shape[dim] - start] {
                    if start + len > shape[dim] {
                        continue;
                    }
                    let s = Slice { dim, start, len };
                    let t = m.load(name, Some(s)).unwrap();
                    assert_eq!(t.to_f32_vec(), slice_ref(&full, &shape, s), "{name} {s:?}");
                }
            }
        }
    }
    // wk is [8, 16] split 4 + 4 along rows: inside one shard is zero-copy, across is gathered.
    let wk = "layers.1.attention.wk.weight";
    assert!(is_mapped(
        &m.load(
            wk,
            Some(Slice {
                dim: 0,
                start: 4,
                len: 4
            })
        )
        .unwrap()
    ));
    assert!(!is_mapped(
        &m.load(
            wk,
            Some(Slice {
                dim: 0,
                start: 2,
                len: 4
            })
        )
        .unwrap()
    ));
    let e = msg(m
        .load(
            wk,
            Some(Slice {
                dim: 0,
                start: 6,
                len: 4,
            }),
        )
        .unwrap_err());
    assert!(e.contains(wk) && e.contains("outside"), "{e}");

    let e = m.load("layers.9.attention.wq.weight", None).unwrap_err();
    assert!(e.is_missing());
    let e = msg(e);
    assert!(
        e.contains("layers.9.attention.wq.weight") && e.contains("consolidated.00.pth"),
        "{e}"
    );
}

#[test]
fn meta_shape_mismatch_between_shards() {
    let e = msg(open(&fixtures().join("meta_mismatch"), HEADS)
        .err()
        .unwrap());
    assert!(
        e.contains("consolidated.01.pth") && e.contains("norm.weight") && e.contains("mismatch"),
        "{e}"
    );
}

#[test]
fn hf_equals_meta() {
    let meta = open(&fixtures().join("meta2"), HEADS).unwrap();
    for dir in ["hf", "hf_sharded"] {
        let hf = open(&fixtures().join(dir), HEADS).unwrap();
        let mut a = meta.names();
        let mut b = hf.names();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{dir}");
        for name in &a {
            let x = meta.load(name, None).unwrap();
            let y = hf.load(name, None).unwrap();
            assert_eq!(x.shape, y.shape, "{dir} {name}");
            assert_eq!(x.dtype, y.dtype, "{dir} {name}");
            assert_eq!(x.bytes.as_slice(), y.bytes.as_slice(), "{dir} {name}");
            assert_eq!(hf.shape(name).unwrap(), x.shape);
        }
        // Head-aligned row slices and column slices of q/k equal the Meta slices.
        for name in [
            "layers.0.attention.wq.weight",
            "layers.1.attention.wk.weight",
        ] {
            let rows = meta.shape(name).unwrap()[0];
            for s in (0..rows).step_by(4).flat_map(|start| {
                (4..=rows - start)
                    .step_by(4)
                    .map(move |len| Slice { dim: 0, start, len })
            }) {
                let x = meta.load(name, Some(s)).unwrap();
                let y = hf.load(name, Some(s)).unwrap();
                assert_eq!(x.bytes.as_slice(), y.bytes.as_slice(), "{name} {s:?}");
            }
            let s = Slice {
                dim: 1,
                start: 5,
                len: 7,
            };
            let x = meta.load(name, Some(s)).unwrap();
            let y = hf.load(name, Some(s)).unwrap();
            assert_eq!(x.shape, y.shape);
            assert_eq!(x.bytes.as_slice(), y.bytes.as_slice(), "{name} {s:?}");
            let e = msg(hf
                .load(
                    name,
                    Some(Slice {
                        dim: 0,
                        start: 2,
                        len: 4,
                    }),
                )
                .unwrap_err());
            assert!(e.contains("whole heads"), "{e}");
        }
        // Non-q/k tensors stay in the map.
        let t = hf.load(
            "layers.0.feed_forward.w1.weight",
            Some(Slice {
                dim: 0,
                start: 3,
                len: 5,
            }),
        );
        assert!(is_mapped(&t.unwrap()));
        assert!(hf.load("layers.0.feed_forward.w1.weight", None).is_ok());
    }
}

#[test]
fn hf_truncated_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("hf");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = dir.path().join("model.safetensors");

    std::fs::write(&st, &bytes[..bytes.len() - 50]).unwrap();
    let hf = HfSource::open(std::slice::from_ref(&st), None, HEADS).unwrap();
    let errs: Vec<String> = hf
        .names()
        .iter()
        .filter_map(|n| hf.load(n, None).err().map(msg))
        .collect();
    assert!(!errs.is_empty());
    for e in &errs {
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }
    // Most tensors still load.
    assert!(errs.len() < hf.names().len());

    std::fs::write(&st, &bytes[..20]).unwrap();
    let e = msg(open(dir.path(), HEADS).err().unwrap());
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(&st, &bytes).unwrap();
    let hf = open(dir.path(), HEADS).unwrap();
    let e = hf.load("nope.weight", None).unwrap_err();
    assert!(e.is_missing());
    assert!(msg(e).contains("model.safetensors"));

    // q/k heads that do not match the rows are refused with the tensor named.
    let wrong = QkHeads {
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 4,
    };
    let hf = open(dir.path(), wrong).unwrap();
    let e = msg(hf.load("layers.0.attention.wq.weight", None).unwrap_err());
    assert!(e.contains("q_proj"), "{e}");
}

#[test]
fn meta_direct_open() {
    let dir = fixtures().join("meta2");
    let m = MetaSource::open(&[dir.join("consolidated.00.pth")]).unwrap();
    assert_eq!(m.mp(), 1);
    // One shard alone is a complete (half-size) model under the same names.
    assert_eq!(
        m.shape("layers.0.attention.wq.weight").unwrap(),
        vec![8, 16]
    );
}

#[test]
fn synthetic_slices_and_scale() {
    let specs = SyntheticSource::llama_specs(64, 1, 4, 2, 96, 50);
    let a = SyntheticSource::new(3, specs.clone());
    let b = SyntheticSource::new(3, specs.clone());
    let c = SyntheticSource::new(4, specs);
    let name = "layers.0.feed_forward.w2.weight";
    let full = a.load(name, None).unwrap();
    assert_eq!(full.shape, vec![64, 96]);
    assert_eq!(full.dtype, DType::BF16);
    assert_eq!(
        full.bytes.as_slice(),
        b.load(name, None).unwrap().bytes.as_slice()
    );
    assert_ne!(
        full.bytes.as_slice(),
        c.load(name, None).unwrap().bytes.as_slice()
    );
    let fv = full.to_f32_vec();
    for s in [
        Slice {
            dim: 0,
            start: 10,
            len: 20,
        },
        Slice {
            dim: 1,
            start: 48,
            len: 48,
        },
        Slice {
            dim: 1,
            start: 7,
            len: 1,
        },
    ] {
        let t = a.load(name, Some(s)).unwrap();
        assert_eq!(t.to_f32_vec(), slice_ref(&fv, &[64, 96], s), "{s:?}");
    }
    let std = (fv.iter().map(|x| x * x).sum::<f32>() / fv.len() as f32).sqrt();
    let want = 1.0 / 96f32.sqrt();
    assert!((std / want - 1.0).abs() < 0.1, "std {std} want {want}");
    let n = a.load("norm.weight", None).unwrap().to_f32_vec();
    assert!(n.iter().all(|x| (0.9..1.1).contains(x)));
    assert!(a.load("nope", None).unwrap_err().is_missing());
}

/// The fixtures' config.json as transformers 5 writes it (hf-tf5/) reads as the Hub layout (hf/).
#[test]
fn transformers5_config_reads_like_the_hub_layout() {
    use herd::model::LlamaConfig;
    for m in ["llama30", "llama31", "llama32tied"] {
        let dir = common::fixture(&format!("models/{m}"));
        let tf5: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("hf-tf5/config.json")).unwrap())
                .unwrap();
        assert!(
            tf5["rope_parameters"]["rope_theta"].is_f64()
                && tf5.get("rope_theta").is_none()
                && tf5.get("rope_scaling").is_none(),
            "{m}: hf-tf5/config.json should be in transformers 5's layout"
        );
        let a = LlamaConfig::from_hf_config(&dir.join("hf/config.json")).unwrap();
        let b = LlamaConfig::from_hf_config(&dir.join("hf-tf5/config.json")).unwrap();
        assert_eq!(a, b, "{m}");
        if m != "llama32tied" {
            let c = LlamaConfig::from_meta_params(&dir.join("meta/params.json")).unwrap();
            assert_eq!(
                c,
                LlamaConfig {
                    max_seq_len: c.max_seq_len,
                    ..a
                },
                "{m}"
            );
        }
    }
}

/// A change to a config file's JSON.
type Edit = fn(&mut serde_json::Value);

/// A checkpoint directory in `root`: the fixture's weights (linked) under an edited config.
fn edited_model(root: &Path, layout: &str, edit: Edit) -> PathBuf {
    let src = common::fixture(&format!("models/llama31/{layout}"));
    let dir = root.join(layout);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name == "config.json" || name == "params.json" {
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            edit(&mut v);
            std::fs::write(dir.join(&name), v.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(std::fs::canonicalize(&p).unwrap(), dir.join(&name))
                .unwrap();
        }
    }
    dir
}

/// A config value herd does not implement stops every command before it computes anything:
/// the message names the file, the key and the value; batch exits 3 (model not loadable).
#[test]
fn a_config_key_herd_does_not_implement_stops_the_load() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt_token_ids\": [1, 2, 3], \"max_tokens\": 2}\n",
    )
    .unwrap();
    let cases: [(&str, Edit, &str); 3] = [
        (
            "hf-tf5",
            |v| v["rope_parameters"]["rope_type"] = "yarn".into(),
            "hf-tf5/config.json: rope_parameters.rope_type = \"yarn\" is not supported",
        ),
        (
            "hf",
            |v| v["attention_bias"] = true.into(),
            "hf/config.json: attention_bias = true is not supported",
        ),
        (
            "meta",
            |v| v["use_qk_norm"] = true.into(),
            "meta/params.json: use_qk_norm = true is not supported",
        ),
    ];
    for (layout, edit, want) in cases {
        let model = edited_model(tmp.path(), layout, edit);
        let m = model.to_str().unwrap();
        let out = tmp.path().join(format!("{layout}.out.jsonl"));
        let (code, _, err) = common::run_herd(&[
            "batch",
            "--model",
            m,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(err.contains(want), "batch on {layout}: {err}");
        assert_eq!(code, 3, "batch on {layout}: {err}");
        // generate and convert refuse the same way (their exit codes belong to issue 11 point 5).
        let (code, _, err) =
            common::run_herd(&["generate", "--model", m, "--prompt-token-ids", "1,2"]);
        assert!(
            code != 0 && err.contains(want),
            "generate on {layout}: {err}"
        );
        let conv = tmp.path().join(format!("{layout}.converted"));
        let (code, _, err) =
            common::run_herd(&["convert", "--model", m, "--output", conv.to_str().unwrap()]);
        assert!(
            code != 0 && err.contains(want),
            "convert on {layout}: {err}"
        );
    }
}
