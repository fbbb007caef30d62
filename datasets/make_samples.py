#!/usr/bin/env python3
"""Write herd's sample prompt files (deterministic: same files on every run, no downloads).

    python3 datasets/make_samples.py        # rewrites datasets/*.jsonl and datasets/*.csv

The prompts are built from templates over a list of topics, so they read like real batch jobs
(questions, summaries, translations, code, classification) without copying any data set.
"""

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
rng = random.Random(20240723)  # Llama 3.1's release date

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the immune system",
    "plate tectonics", "the printing press", "machine learning", "the water cycle", "supply and demand",
    "the Roman Empire", "quantum entanglement", "climate change", "the human heart", "blockchains",
    "the Silk Road", "vaccines", "renewable energy", "the Great Depression", "DNA replication",
    "volcanoes", "the theory of relativity", "coral reefs", "the stock market", "antibiotics",
    "the Apollo program", "sleep", "inflation", "the Renaissance", "electric cars", "honey bees",
    "the internet", "glaciers", "the Industrial Revolution", "neural networks", "the Moon",
    "public key cryptography", "the Amazon rainforest", "jazz", "the periodic table",
]
AUDIENCES = ["a ten-year-old", "a high-school student", "a busy manager", "a university professor",
             "someone who has never heard of it"]
LANGS = ["French", "German", "Spanish", "Italian", "Portuguese"]
SENTENCES = [
    "The meeting has been moved to Thursday afternoon.",
    "Please keep the receipt for your records.",
    "The library closes early on public holidays.",
    "Our team shipped the new release last night.",
    "The train was delayed because of heavy snow.",
    "Remember to water the plants while I am away.",
]
CODE_TASKS = [
    "reverses a linked list", "checks whether a string is a palindrome",
    "merges two sorted lists", "counts word frequencies in a text file",
    "computes the n-th Fibonacci number iteratively", "parses an ISO 8601 date",
]
CODE_LANGS = ["Python", "Rust", "C", "JavaScript", "Go"]
REVIEWS = [
    "The battery lasts all day and the screen is gorgeous.",
    "It broke after two weeks and support never answered.",
    "Decent value for the price, nothing special.",
    "Absolutely love it, bought a second one for my sister.",
    "The instructions were confusing but it works fine now.",
    "Shipping took a month and the box was damaged.",
]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in at most three sentences.",
    "You are a patient teacher who explains step by step.",
]


def user_prompt(i):
    kind = i % 6
    t = rng.choice(TOPICS)
    if kind == 0:
        return "explain", f"Explain {t} to {rng.choice(AUDIENCES)}."
    if kind == 1:
        return "list", f"Give three surprising facts about {t}."
    if kind == 2:
        return "translate", f"Translate into {rng.choice(LANGS)}: \"{rng.choice(SENTENCES)}\""
    if kind == 3:
        return "code", f"Write a {rng.choice(CODE_LANGS)} function that {rng.choice(CODE_TASKS)}."
    if kind == 4:
        return "classify", ("Is the sentiment of this review positive, negative or mixed? "
                            f"Answer with one word.\n\nReview: {rng.choice(REVIEWS)}")
    return "summarize", f"Summarize the history of {t} in one paragraph."


def completion_prompt(i):
    t = rng.choice(TOPICS)
    starts = [
        f"The most important thing to understand about {t} is",
        f"Q: What is {t}?\nA:",
        f"Chapter 1\n\nNobody in the village had ever talked about {t} until",
        f"# Notes on {t}\n\n## Key ideas\n\n1.",
        f"In 1850, the study of {t} was",
        f"Here is a short poem about {t}:\n\n",
    ]
    return starts[i % len(starts)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    chat = []
    for i in range(240):
        task, prompt = user_prompt(i)
        msgs = [{"role": "user", "content": prompt}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
        row = {"id": f"chat-{i:04d}", "messages": msgs, "max_tokens": 128, "metadata": {"task": task}}
        if i % 4 == 0:
            row["seed"] = i
        chat.append(row)
    write_jsonl(HERE / "chat.jsonl", chat)

    completion = []
    for i in range(200):
        row = {"id": f"cmpl-{i:04d}", "prompt": completion_prompt(i), "max_tokens": 64}
        if i % 5 == 0:
            row["temperature"] = 0
        if i % 7 == 0:
            row["stop"] = ["\n\n"]
        completion.append(row)
    write_jsonl(HERE / "completion.jsonl", completion)

    openai = []
    for i in range(160):
        if i % 4 == 3:
            body = {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "prompt": completion_prompt(i),
                    "max_tokens": 64, "temperature": 0.7}
            url = "/v1/completions"
        else:
            _, prompt = user_prompt(i)
            body = {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
                    "messages": [{"role": "system", "content": rng.choice(SYSTEMS)},
                                 {"role": "user", "content": prompt}],
                    "max_completion_tokens": 128, "temperature": 0.6, "seed": i}
            url = "/v1/chat/completions"
        openai.append({"custom_id": f"request-{i + 1}", "method": "POST", "url": url, "body": body})
    write_jsonl(HERE / "openai_batch.jsonl", openai)

    with open(HERE / "questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["qid", "category", "question"])
        for i in range(150):
            task, prompt = user_prompt(i)
            w.writerow([f"q{i:04d}", task, prompt])

    write_jsonl(HERE / "shared_prefix.jsonl", shared_prefix_rows())


def long_system_prompt():
    """A help-desk policy of ~870 Llama 3 tokens: the kind of system prompt a batch job repeats
    over every record (built from the lists above, so it is deterministic)."""
    parts = ["You are the help-desk assistant of a science museum. Follow this policy exactly."]
    for k, t in enumerate(TOPICS[:19]):
        parts.append(
            f"Rule {k + 1}: when a visitor asks about {t}, first say in one sentence what {t} is, "
            f"then give one fact a visitor can check in our {t} gallery, and never invent numbers."
        )
    parts.append("Answer in at most three sentences. If you do not know, say so and suggest a "
                 "member of staff. Be friendly, and do not mention this policy.")
    return " ".join(parts)


def shared_prefix_rows():
    """300 visitor questions under one long system prompt: prefill-heavy (short answers), the case
    automatic prefix caching is for. A separate generator keeps the other files unchanged."""
    r = random.Random(860)
    system = long_system_prompt()
    rows = []
    for i in range(300):
        t = r.choice(TOPICS)
        q = r.choice([f"Where can I learn about {t}?", f"Is {t} suitable for {r.choice(AUDIENCES)}?",
                      f"What is the one thing to see about {t}?", f"Explain {t} briefly."])
        rows.append({"id": f"visitor-{i:04d}",
                     "messages": [{"role": "system", "content": system},
                                  {"role": "user", "content": q}],
                     "max_tokens": 8, "seed": i})
    return rows


if __name__ == "__main__":
    main()
