"""Build the embedded demo for `fullscale train` (no config): a tiny pretrained Llama base model,
its character-level tokenizer, and the bundled demo dataset.

Everything is deterministic (seeded) and offline:

1. A character-level tokenizer (string.printable + chat special tokens) with a prefix-stable
   chat template, the same design as tests/tiny.py.
2. A generated pretraining corpus of short chat conversations on *other* tasks than the demo
   task (repeat, uppercase, lowercase, first/last word, spelling, counting, greetings), so the
   base learns the chat template, the characters, copying, and to end every answer with
   <|end|> and </s>.
3. Full pretraining of a tiny LlamaForCausalLM with plain PyTorch AdamW on CPU (a few minutes).
4. The base model + tokenizer are saved to src/fullscale/demo/base/ (save_pretrained, fp32
   safetensors), and the demo dataset to src/fullscale/demo/data/train.jsonl.

The demo task (not in the pretraining corpus) is a fixed letter-substitution cipher: "shift every
letter one step forward in the alphabet" (a->b, ..., z->a). It generalises, so held-out eval rows
are learnable from the training rows, and a LoRA adapter learns it in about a minute on a 2-core
CPU (see scripts/measure_demo_task.py and src/fullscale/demo/README.md).

Usage:
    .venv/bin/python scripts/build_demo_base.py               # pretrain + write base and data
    .venv/bin/python scripts/build_demo_base.py --data-only   # only (re)write train.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "src" / "fullscale" / "demo"
BASE_DIR = DEMO_DIR / "base"
DATA_FILE = DEMO_DIR / "data" / "train.jsonl"

SEED = 1234

# ---------------------------------------------------------------------------------------------
# Tokenizer (same design as tests/tiny.py; copied so this script does not import from tests/)
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_tokenizer():
    """A character-level fast tokenizer (~108 tokens) with a prefix-stable chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------

WORDS = """
apple river stone cloud green house light table water bread chair dream earth field glass
heart honey horse lemon money music night ocean paper piano plant queen radio salad sheep
smile snake space storm sugar tiger towel train truck voice whale wheel woman world yacht
zebra actor angel beach bell bird boat book cake camp card coat corn desk door duck face farm
fire fish flag frog game gift girl goat gold hand hat hill home kite king lake lamp leaf lion
map milk moon nest nose park pear pen pig pink rain ring road rock rose sail salt sand seed
ship shoe sky snow sock song star sun tea tent toy tree wave wind wolf wood yard zoo bag bed
box bus cap car cat cow cup dog egg fan fox ice ink jam jar key leg mud net owl pan pot rat
red sea tin top van web arm art ant bat bee bow dot ear elf fig gem gum hen hut jet kit lip
log mat mop nut oak orb pea pin rug saw tub urn vet wax yak able amber basil candy daisy eagle
fancy grape jolly koala lucky mango noble olive quiet robin silly tulip ultra vivid windy young
blue brown black white orange purple silver yellow small large quick slow happy sad brave
calm cold warm dark bright soft loud tiny giant old new fast late early clean fresh sweet
""".split()
WORDS = sorted(set(WORDS))


def _phrase(rng: random.Random, lo: int = 1, hi: int = 3) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


# ---------------------------------------------------------------------------------------------
# Pretraining corpus: other tasks than the demo task
# ---------------------------------------------------------------------------------------------

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def pretrain_example(rng: random.Random) -> list[dict]:
    kind = rng.randrange(9)
    p = _phrase(rng)
    if kind == 0:
        q = rng.choice(["Repeat: {}", "Say: {}", "Echo: {}", "Copy this: {}"]).format(p)
        a = p
    elif kind == 1:
        q = rng.choice(["Uppercase: {}", "Shout: {}", "In capitals: {}"]).format(p)
        a = p.upper()
    elif kind == 2:
        p = " ".join(w.capitalize() if rng.random() < 0.5 else w.upper() for w in p.split())
        q = rng.choice(["Lowercase: {}", "Whisper: {}"]).format(p)
        a = p.lower()
    elif kind == 3:
        p = _phrase(rng, 2, 4)
        q = rng.choice(["First word: {}", "What is the first word? {}"]).format(p)
        a = p.split()[0]
    elif kind == 4:
        p = _phrase(rng, 2, 4)
        q = rng.choice(["Last word: {}", "What is the last word? {}"]).format(p)
        a = p.split()[-1]
    elif kind == 5:
        w = rng.choice(WORDS)
        q = rng.choice(["Spell: {}", "Spell out {}"]).format(w)
        a = " ".join(w)
    elif kind == 6:
        p = _phrase(rng, 1, 5)
        q = rng.choice(["Count the words: {}", "How many words? {}"]).format(p)
        a = NUMBER_WORDS[len(p.split())]
    elif kind == 7:
        p = _phrase(rng, 2, 3)
        q = rng.choice(["Join with dashes: {}", "Hyphenate: {}"]).format(p)
        a = "-".join(p.split())
    else:
        q, a = rng.choice(
            [
                ("Hello", "Hello! How can I help?"),
                ("Hi", "Hi there!"),
                ("Who are you?", "I am a tiny demo model."),
                ("Thanks", "You are welcome."),
                ("Say yes", "yes"),
                ("Say no", "no"),
                ("What can you do?", "I can repeat, spell and count words."),
            ]
        )
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.1:
        msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return msgs


# ---------------------------------------------------------------------------------------------
# Demo task (NOT in the pretraining corpus)
# ---------------------------------------------------------------------------------------------


def shift_one(text: str) -> str:
    """The demo cipher: every letter one step forward in the alphabet (z->a, case kept)."""
    out = []
    for ch in text:
        if "a" <= ch <= "z":
            out.append(chr((ord(ch) - 97 + 1) % 26 + 97))
        elif "A" <= ch <= "Z":
            out.append(chr((ord(ch) - 65 + 1) % 26 + 65))
        else:
            out.append(ch)
    return "".join(out)


DEMO_PROMPTS = ["Encode: {}", "Encode this: {}", "Cipher: {}", "Secret code for: {}"]


def demo_rows(n: int, seed: int = SEED + 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = _phrase(rng, 1, 3)
        q = rng.choice(DEMO_PROMPTS).format(p)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": shift_one(p)},
                ]
            }
        )
    return rows


def write_demo_data(n: int = 1200) -> None:
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    rows = demo_rows(n)
    with DATA_FILE.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} demo rows to {DATA_FILE.relative_to(ROOT)}")


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------


def encode_conversation(tok, messages) -> list[int]:
    """Token ids of the rendered conversation followed by </s>."""
    text = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id]


def check_template(tok) -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    for i in range(len(msgs)):
        a = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        b = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        assert b.startswith(a.removesuffix("<|assistant|>")), (a, b)
    a = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    b = tok.apply_chat_template(msgs, tokenize=False)
    assert b.startswith(a), (a, b)


def pretrain(args) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)

    tok = make_tokenizer()
    check_template(tok)
    end_id = tok.convert_tokens_to_ids("<|end|>")

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, hidden {args.hidden}, {args.layers} layers")

    # Corpus: generated once, deterministic.
    corpus = [encode_conversation(tok, pretrain_example(rng)) for _ in range(args.corpus_size)]
    n_tok = sum(map(len, corpus))
    print(f"corpus: {len(corpus)} conversations, {n_tok} tokens, 9 task families")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, int(0.03 * args.steps))

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        prog = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    model.train()
    t0 = time.time()
    order = list(range(len(corpus)))
    pos = len(order)
    step = 0
    for step in range(args.steps):
        if pos + args.batch > len(order):
            rng.shuffle(order)
            pos = 0
        batch = [corpus[i] for i in order[pos : pos + args.batch]]
        pos += args.batch
        L = max(map(len, batch))
        ids = torch.full((len(batch), L), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            att[i, : len(seq)] = 1
        labels = ids.masked_fill(att == 0, -100)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s", flush=True)
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"time budget reached at step {step}")
            break
    train_s = time.time() - t0
    steps_done = step + 1

    # Quick sanity generations on pretraining tasks.
    model.eval()
    probe = random.Random(99)
    for _ in range(4):
        msgs = pretrain_example(probe)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=[tok.eos_token_id, end_id],
                                 pad_token_id=tok.pad_token_id)
        got = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"  {msgs[-2]['content']!r} -> {got!r} (expected {msgs[-1]['content']!r})")

    BASE_DIR.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end_id],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    # fp32 (~3.3 MB): transformers 5 loads a checkpoint in its saved dtype by default, and LoRA
    # training on CPU is faster and more accurate in fp32 than in bf16.
    model.config.dtype = "float32"
    for stale in BASE_DIR.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(BASE_DIR, safe_serialization=True)
    # save_jinja_files=False: keep the chat template inside tokenizer_config.json.
    tok.save_pretrained(BASE_DIR, save_jinja_files=False)
    size = sum(p.stat().st_size for p in BASE_DIR.iterdir() if p.is_file())
    print(
        f"\nThe demo base is a {n_params / 1e6:.2f}M-parameter Llama ({args.layers} layers, hidden {args.hidden}), "
        f"pretrained from random init for {steps_done} steps ({train_s:.0f}s on CPU, batch {args.batch}) on a "
        f"generated corpus of {len(corpus)} short chat conversations (repeat, upper/lowercase, first/last word, "
        f"spelling, word counting, hyphenation, greetings). It knows the chat template and copying; it does not "
        f"know the demo task. Saved as fp32 to {BASE_DIR.relative_to(ROOT)} ({size / 1e6:.2f} MB)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-only", action="store_true", help="only write the demo dataset")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--corpus-size", type=int, default=40000)
    ap.add_argument("--max-seconds", type=float, default=0, help="stop early after this many seconds (0: never)")
    ap.add_argument("--data-rows", type=int, default=1200)
    args = ap.parse_args()
    write_demo_data(args.data_rows)
    if not args.data_only:
        pretrain(args)


if __name__ == "__main__":
    main()
