//! `herd convert` round trips: converted files give the same log-probs as their source, at the tp
//! they were written for and at others; Meta .pth output is a torch.save zip whose pickle Python
//! can disassemble.

mod common;

use std::path::Path;
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
