//! `herd convert` round trips: converted files give the same log-probs as their source, at the tp
//! they were written for and at others; Meta .pth output is a torch.save zip whose pickle Python
//! can disassemble.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use common::run_herd as herd;

fn logprobs(model: &Path) -> Value {
    let (code, out, err) = herd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-token-ids",
        "1,17,33,5,6,7,8",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--prompt-logprobs",
    ]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(out.trim()).expect("one JSON record")
}

fn assert_same(a: &Value, b: &Value) {
    assert_eq!(a["token_ids"], b["token_ids"]);
    let (pa, pb) = (
        a["prompt_logprobs"].as_array().unwrap(),
        b["prompt_logprobs"].as_array().unwrap(),
    );
    assert_eq!(pa.len(), pb.len());
    for (x, y) in pa.iter().zip(pb).skip(1) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

fn convert(src: &Path, out: &Path, tp: usize, format: &str) {
    let (code, _, err) = herd(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--tp",
        &tp.to_string(),
        "--format",
        format,
    ]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn per_rank_safetensors_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for src in ["llama31/hf", "llama31/meta-mp2", "llama30/meta"] {
        let src = common::fixture(&format!("models/{src}"));
        let want = logprobs(&src);
        // tp 4 on llama31 replicates its 2 KV heads: the reader must not stitch duplicates.
        for tp in [1, 2, 4] {
            let out = tmp.path().join(format!(
                "{}-{}-st{tp}",
                src.parent().unwrap().file_name().unwrap().to_string_lossy(),
                src.file_name().unwrap().to_string_lossy()
            ));
            convert(&src, &out, tp, "safetensors");
            assert!(out.join("herd-tp.json").exists());
            assert!(out
                .join(format!("rank-{:02}-of-{tp:02}.safetensors", tp - 1))
                .exists());
            // Loaded at tp 1 here: every slice is stitched back from the rank files.
            assert_same(&logprobs(&out), &want);
        }
    }
}

#[test]
fn meta_pth_round_trip_and_torch_format() {
    let tmp = tempfile::tempdir().unwrap();
    for (src, tp) in [("llama31/hf", 2), ("llama30/meta", 4), ("llama31/meta", 1)] {
        let src = common::fixture(&format!("models/{src}"));
        let out = tmp.path().join(format!("meta{tp}"));
        convert(&src, &out, tp, "meta");
        assert_same(&logprobs(&out), &logprobs(&src));
        let pth = out.join(format!("consolidated.{:02}.pth", tp - 1));
        // What torch.load needs: a zip with <dir>/data.pkl (a protocol-2 pickle naming
        // torch._utils._rebuild_tensor_v2 and the storage class), data/N records and version.
        let script = r#"
import sys, zipfile, pickletools, io
z = zipfile.ZipFile(sys.argv[1])
names = z.namelist()
assert 'archive/data.pkl' in names and 'archive/version' in names, names
assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
pkl = z.read('archive/data.pkl')
out = io.StringIO()
pickletools.dis(pkl, out=out)
text = out.getvalue()
assert '_rebuild_tensor_v2' in text and 'BFloat16Storage' in text and 'BINPERSID' in text
n = sum(1 for n in names if n.startswith('archive/data/'))
print(n)
"#;
        let r = Command::new("python3")
            .args(["-c", script, pth.to_str().unwrap()])
            .output()
            .expect("python3 runs (CI images have it)");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let n: usize = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
        assert_eq!(n, 3 + 9 * 2, "one storage per tensor (2 layers)");
    }
}

#[test]
fn meta_format_refuses_kv_replication() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::fixture("models/llama31/meta");
    let (code, _, err) = herd(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--output",
        tmp.path().join("x").to_str().unwrap(),
        "--tp",
        "4",
        "--format",
        "meta",
    ]);
    assert_eq!(code, 2, "arguments that do not fit the model: {err}");
    assert!(err.contains("cannot replicate KV heads"), "{err}");
}

/// A directory holding `files` (name, content) and `links` (name -> existing file).
fn source_dir(root: &Path, files: &[(&str, &str)], links: &[(&str, PathBuf)]) -> PathBuf {
    let dir = root.join("src");
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    for (name, target) in links {
        std::os::unix::fs::symlink(target, dir.join(name)).unwrap();
    }
    dir
}

#[test]
fn tokenizer_and_generation_files_travel_with_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = common::fixture("models/llama31/hf");
    let side = [
        ("tokenizer.json", "{\"stand-in\": \"tokenizer.json\"}"),
        ("tokenizer_config.json", "{\"chat_template\": \"...\"}"),
        (
            "generation_config.json",
            "{\"temperature\": 0.6, \"top_p\": 0.9}",
        ),
        (
            "special_tokens_map.json",
            "{\"bos_token\": \"<|begin_of_text|>\"}",
        ),
        ("original/tokenizer.model", "stand-in tokenizer.model"),
    ];
    let config = std::fs::read_to_string(hf.join("config.json")).unwrap();
    let mut files = side.to_vec();
    files.push(("config.json", &config));
    let src = source_dir(
        tmp.path(),
        &files,
        &[("model.safetensors", hf.join("model.safetensors"))],
    );
    for (format, tp) in [("safetensors", 2), ("meta", 1)] {
        let out = tmp.path().join(format);
        convert(&src, &out, tp, format);
        for (name, text) in &side[..4] {
            let got = std::fs::read_to_string(out.join(name));
            assert_eq!(got.ok().as_deref(), Some(*text), "{format}: {name}");
        }
        // The model loads with tokenizer.json, so original/tokenizer.model stays behind.
        assert!(!out.join("tokenizer.model").exists(), "{format}");
        let loaded = herd::model::loader::open_model(out.to_str().unwrap()).unwrap();
        assert_eq!(
            loaded.tokenizer,
            Some(out.join("tokenizer.json")),
            "{format}"
        );
    }

    // An HF checkpoint whose only tokenizer is original/tokenizer.model, and a Meta one.
    let tmp = tempfile::tempdir().unwrap();
    let src = source_dir(
        tmp.path(),
        &[
            ("config.json", &config),
            ("original/tokenizer.model", "stand-in tokenizer.model"),
        ],
        &[("model.safetensors", hf.join("model.safetensors"))],
    );
    let out = tmp.path().join("from-original");
    convert(&src, &out, 1, "safetensors");
    let got = std::fs::read_to_string(out.join("tokenizer.model")).unwrap();
    assert_eq!(got, "stand-in tokenizer.model");

    let meta = common::fixture("models/llama31/meta");
    let params = std::fs::read_to_string(meta.join("params.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = source_dir(
        tmp.path(),
        &[
            ("params.json", &params),
            ("tokenizer.model", "stand-in tokenizer.model"),
            ("generation_config.json", "{}"),
        ],
        &[("consolidated.00.pth", meta.join("consolidated.00.pth"))],
    );
    for format in ["safetensors", "meta"] {
        let out = tmp.path().join(format);
        convert(&src, &out, 2, format);
        assert_eq!(
            std::fs::read_to_string(out.join("params.json")).unwrap(),
            params
        );
        for name in ["tokenizer.model", "generation_config.json"] {
            assert!(out.join(name).is_file(), "{format}: {name}");
        }
    }
}

#[test]
fn a_built_in_model_converts_to_a_checkpoint_that_gives_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let want = logprobs(Path::new("random:tiny"));
    for tp in [1, 2] {
        let out = tmp.path().join(format!("tiny-tp{tp}"));
        convert(Path::new("random:tiny"), &out, tp, "safetensors");
        // An ordinary checkpoint: config.json (transformers 5 layout) and the tokenizer it ran with.
        let cfg = herd::model::LlamaConfig::from_hf_config(&out.join("config.json")).unwrap();
        assert_eq!(cfg, herd::model::LlamaConfig::preset("tiny").unwrap());
        let text = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(text.contains("\"rope_parameters\""), "{text}");
        assert_eq!(
            std::fs::read(out.join("tokenizer.model")).unwrap(),
            std::fs::read(herd::tokenizer::default_tokenizer_path()).unwrap()
        );
        let got = logprobs(&out);
        assert_same(&got, &want);
        assert_eq!(
            got["prompt_logprobs"], want["prompt_logprobs"],
            "bit-identical"
        );
    }
    // Meta's params.json cannot say "tied embeddings": refused, not written wrong.
    let (code, _, err) = herd(&[
        "convert",
        "--model",
        "random:tiny",
        "--output",
        tmp.path().join("meta").to_str().unwrap(),
        "--format",
        "meta",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("tied embeddings") && err.contains("use --format safetensors"),
        "{err}"
    );
    assert!(
        !tmp.path().join("meta").exists(),
        "refused before writing anything"
    );
    let (code, _, err) = herd(&[
        "convert",
        "--model",
        "random:3b",
        "--output",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("random:tiny"), "{err}");
}

/// llama3 RoPE parameters other than Meta's defaults survive the trip to params.json
/// (rope_scaling_factor, rope_high_freq_factor) or are refused there, never dropped.
#[test]
fn meta_params_keep_the_rope_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = common::fixture("models/llama31/hf-tf5");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    cfg["rope_parameters"]["factor"] = 16.0.into();
    cfg["rope_parameters"]["high_freq_factor"] = 2.0.into();
    let weights = std::fs::canonicalize(hf.join("model.safetensors")).unwrap();
    let src = source_dir(
        tmp.path(),
        &[("config.json", &cfg.to_string())],
        &[("model.safetensors", weights.clone())],
    );
    let out = tmp.path().join("meta");
    convert(&src, &out, 1, "meta");
    let params: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["rope_scaling_factor"], 16.0);
    assert_eq!(params["rope_high_freq_factor"], 2.0);
    let want = logprobs(&src);
    assert_same(&logprobs(&out), &want);
    assert_ne!(want, logprobs(&common::fixture("models/llama31/hf")));

    // Meta's params.json has no key for low_freq_factor: refused, not written as 1.
    cfg["rope_parameters"]["low_freq_factor"] = 0.5.into();
    let tmp = tempfile::tempdir().unwrap();
    let src = source_dir(
        tmp.path(),
        &[("config.json", &cfg.to_string())],
        &[("model.safetensors", weights)],
    );
    let (code, _, err) = herd(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--output",
        tmp.path().join("meta").to_str().unwrap(),
        "--format",
        "meta",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot be written as Meta params.json exactly"),
        "{err}"
    );
}
