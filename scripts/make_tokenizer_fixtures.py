#!/usr/bin/env python3
"""Build the Llama 3 tokenizer identity fixtures for tests/tokenizer.rs.

Run by hand, once, from the repository root, with Meta's reference implementation
(the `llama-models` package) installed, e.g.:

    /work/refenv/venv/bin/python scripts/make_tokenizer_fixtures.py

It generates about 1.2 MB of mixed text deterministically (fixed seed, word lists
below): code, English prose, German/French with accents, CJK, emoji including ZWJ
sequences, long whitespace runs (30,000+ spaces; tabs and newlines), numbers, text
that looks like special tokens ("<|eot_id|>"), and one document over 450,000
characters so Meta's 400,000-character window matters. Every document is encoded
with Meta's `Tokenizer.encode(bos=False, eos=False)`; a few chat dialogs go through
Meta's `ChatFormat.encode_dialog_prompt`.

Dialog contents are passed to Meta stripped (Python `str.strip()`): herd strips
message content like Meta's original llama3 ChatFormat and the HF chat template,
while llama_models 0.3 does not. The fixture keeps the unstripped content, so the
Rust test also checks that herd strips.

Output: tests/fixtures/tokenizer/meta_llama3.json.gz, a gzipped JSON object
{"source", "docs": [{"text", "ids"}], "dialogs": [{"messages", "ids"}]}.
"""

import gzip
import json
import random
import sys
from pathlib import Path

from llama_models.datatypes import RawMessage
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer

SEED = 20261126
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizer" / "meta_llama3.json.gz"

ENGLISH = (
    "the of and to in is that it was for on are with as his they be at one have this from "
    "by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air "
    "well also play small end put home read hand port large spell add even land here must big "
    "high such follow act why ask men change went light kind off need house picture try us again "
    "animal point mother world near build self earth father head stand own page should country "
    "found answer school grow study still learn plant cover food sun four between state keep eye "
    "never last let thought city tree cross farm hard start might story saw far sea draw left late "
    "run don't while press close night real life few north open seem together next white children "
    "GPU tensor inference latency throughput cluster Slurm MPI rank shard checkpoint quantization "
    "I'm you're we've they'll she'd it's isn't WASN'T He'S THEY'RE O'Brien rock'n'roll"
).split()

GERMAN = (
    "Über Änderungen größer Straße Fußgänger Mädchen schön Grüße müssen können wäre Bäume "
    "Öffentlichkeit Käse Brötchen Schlüssel Tür Glück übermorgen Donaudampfschifffahrtsgesellschaft "
    "und der die das ist nicht mit ein eine zu auf für sich dem auch es an werden aus er hat dass"
).split()

FRENCH = (
    "élève être très déjà où là ça garçon français Noël naïve cœur œuvre hôpital forêt "
    "château crème brûlée à côté de la mer l'école qu'il n'est pas aujourd'hui s'il vous plaît "
    "Ça été ÉCOLE Île Ôter œil"
).split()

OTHER_SCRIPTS = [
    "日本語のテキストです。東京は晴れ、明日は雨でしょう。",
    "中文文本：今天天气很好，我们去公园散步吧。人工智能正在改变世界。",
    "한국어 문장입니다. 안녕하세요, 반갑습니다!",
    "Русский текст: съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "עברית: שלום עולם",
    "العربية: مرحبا بالعالم ١٢٣٤٥٦٧٨٩٠",
    "हिन्दी: नमस्ते दुनिया १२३",
    "ไทย: สวัสดีชาวโลก",
    "Tiếng Việt: Xin chào thế giới, cảm ơn bạn rất nhiều.",
    "Combining: e\u0301 a\u0308 n\u0303 Z\u0335\u0321a\u0334lgo",
    "Numbers in other scripts: Ⅻ ½ ² ³ ① ٣ ߃ 𝟘𝟙𝟚",
]

EMOJI = [
    "😀", "🙂", "🎉", "🚀", "❤️", "👍🏽", "🇩🇪", "🇫🇷", "🏳️‍🌈", "👨‍👩‍👧‍👦", "👩🏾‍💻",
    "🧑‍🔬", "🤷‍♀️", "✨", "🔥", "🐍", "🦀", "𝕳𝖊𝖗𝖉", "☕", "🫠",
]

SPECIAL_LOOKING = [
    "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_7|>", "<|eom_id|>", "<|python_tag|>", "<|image|>", "<|", "|>",
    "<|end_of_text|>",
]

CODE = [
    'fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * i).collect();\n    println!("{x:?}");\n}\n',
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;\n",
    "{\"role\": \"user\", \"content\": \"Hallo\\u00e9\", \"n\": [1, 2.5, -3e10]}\n",
    "if [[ -n \"${HOME:-}\" ]]; then\n  echo \"$HOME\" | tr '[:lower:]' '[:upper:]'\nfi\n",
    "x = a->b; y = !x && (z || w); i += 1; arr[i] <<= 2; /* comment */ // done\r\n",
    "<div class=\"note\">&amp; &lt;tag&gt; &#x1F600;</div>\n",
    "    indented line\n\t\ttabbed line\n  \n\n\n\n",
]

WHITESPACE = [
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u2003",
    "\x0b", "\x0c", "\x1c", "\x1f", "\u0085", " \n ", "\t \t",
]


def number(rng):
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if kind == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 8)}f}"
    if kind == 2:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 3:
        return f"{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
    if kind == 4:
        return hex(rng.randrange(1 << 64))
    return f"{rng.randrange(100)}%"


def sentence(rng, words):
    n = rng.randrange(3, 25)
    ws = [rng.choice(words) for _ in range(n)]
    if rng.random() < 0.5:
        ws[0] = ws[0].capitalize()
    if rng.random() < 0.2:
        ws.insert(rng.randrange(len(ws) + 1), number(rng))
    return " ".join(ws) + rng.choice([".", ".", ".", "!", "?", ",", ";", ":", "...", " —"])


def segment(rng):
    r = rng.random()
    if r < 0.35:
        return sentence(rng, ENGLISH) + rng.choice([" ", " ", "\n", "\n\n"])
    if r < 0.45:
        return sentence(rng, GERMAN) + rng.choice([" ", "\n"])
    if r < 0.55:
        return sentence(rng, FRENCH) + rng.choice([" ", "\n"])
    if r < 0.65:
        return rng.choice(OTHER_SCRIPTS) + rng.choice(["", " ", "\n"])
    if r < 0.72:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randrange(1, 6))) + rng.choice(["", " "])
    if r < 0.85:
        return rng.choice(CODE)
    if r < 0.9:
        return number(rng) + rng.choice([" ", ", ", "\n"])
    if r < 0.95:
        return rng.choice(WHITESPACE) * rng.randrange(1, 40)
    return rng.choice(SPECIAL_LOOKING) + rng.choice(["", " ", "\n"])


def document(rng, size):
    parts = []
    n = 0
    while n < size:
        s = segment(rng)
        parts.append(s)
        n += len(s)
    return "".join(parts)


def documents(rng):
    docs = [
        "",
        " ",
        "Hello, world!",
        "<|eot_id|><|begin_of_text|>",
        "\n" * 7,
        " " * 30_001 + "after the spaces",
        "x" + " " * 25_000 + "y" + " " * 25_001,
        "\t\n " * 12_000,
        "\n" * 26_000 + "end",
        "a\u3000" * 20_000,
        "ab;" * 10_000,  # 30,000 non-whitespace characters in a row
        "é" * 26_000,
        "😀" * 26_000,
        "".join(rng.choice("abcdefghij") for _ in range(3000)),
        "\x1c\x1d\x1e\x1f" * 7_000 + "z",
        document(rng, 470_000),
    ]
    # A few hundred documents of varied size, log-uniform from 10 to 10,000 chars.
    while sum(len(d) for d in docs) < 1_150_000:
        docs.append(document(rng, int(10 ** rng.uniform(1, 4.0))))
    return docs


def dialogs(rng):
    return [
        [{"role": "user", "content": "Hello, world!"}],
        [
            {"role": "system", "content": "You are a helpful assistant. Antworte auf Deutsch."},
            {"role": "user", "content": "  Wie spät ist es in 東京? 🕐  \n"},
            {"role": "assistant", "content": "\nEs ist 14:30 Uhr. <|eot_id|> 🎉\n\n"},
            {"role": "user", "content": "Danke! 👨‍👩‍👧‍👦"},
        ],
        [
            {"role": "system", "content": "\t" + rng.choice(CODE)},
            {"role": "user", "content": "Run it"},
            {"role": "assistant", "content": "<|python_tag|>print(1)"},
            {"role": "tool", "content": "1\n"},
            {"role": "ipython", "content": " {\"ok\": true} "},
        ],
        [{"role": "user", "content": document(rng, 5000)}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "   "}],
        [{"role": "user", "content": "\x1c trimmed by str.strip \x1f"}],
    ]


def main():
    tok = Tokenizer.get_instance()
    fmt = ChatFormat(tok)
    rng = random.Random(SEED)

    docs = documents(rng)
    out_docs = []
    total_chars = 0
    total_bytes = 0
    total_ids = 0
    for text in docs:
        ids = tok.encode(text, bos=False, eos=False)
        assert tok.decode(ids) == text
        out_docs.append({"text": text, "ids": ids})
        total_chars += len(text)
        total_bytes += len(text.encode("utf-8"))
        total_ids += len(ids)

    out_dialogs = []
    for messages in dialogs(rng):
        # Meta's role name for tool output is "tool"; herd also accepts "ipython".
        raw = [
            RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m["content"].strip())
            for m in messages
        ]
        ids = fmt.encode_dialog_prompt(raw).tokens
        out_dialogs.append({"messages": messages, "ids": ids})

    data = {
        "source": "llama_models Tokenizer/ChatFormat via scripts/make_tokenizer_fixtures.py, seed %d" % SEED,
        "docs": out_docs,
        "dialogs": out_dialogs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # mtime=0 keeps the gzip bytes reproducible.
    with open(OUT, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(blob)
    print(
        f"{len(out_docs)} docs, {total_chars} chars, {total_bytes} bytes, {total_ids} ids; "
        f"{len(out_dialogs)} dialogs; wrote {OUT} ({OUT.stat().st_size} bytes)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
