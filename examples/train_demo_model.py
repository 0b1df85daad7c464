"""Train the bundled demo model: a small Llama on the Python 3.11 documentation.

Reproduce the shipped folder (about 40 minutes on one CPU thread)::

    apt-get download python3.11-doc          # Debian 12; the text is the docs' reST sources
    OMP_NUM_THREADS=1 python examples/train_demo_model.py \
        --text python3.11-doc_*.deb --out swarm/assets/models/swarm-demo

``--text`` takes the ``.deb`` itself (unpacked with ``dpkg-deb -x``) or any folder; every
``*.rst.txt`` file under it is one document. Documents are split into train and held-out by a
hash of their path, so the split does not depend on file order. Everything is seeded.

The script is plain torch plus ``tokenizers`` and ``safetensors``: it does not import
``transformers``. The model below uses Hugging Face's Llama tensor names, so the folder it
writes loads with ``LlamaForCausalLM`` and with ``swarm.shards``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

EOS = "<|endoftext|>"
HELD_OUT_EVERY = 20  # one document in 20 (by path hash) is held out
SKIP_DOCS = ("whatsnew/changelog.rst.txt",)  # issue-number lists, not prose
PROMPTS = (
    "The list",
    "A function is",
    "To open a file,",
    "Python is",
    "The dictionary",
)


# --------------------------------------------------------------------------- text


_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LITERAL = re.compile(r"``([^`]*)``")
_ADORNMENT = re.compile(r"^\s*([=\-*^~#\"+`'.])\1{3,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\. ")
_FIELD = re.compile(r"^\s+:[\w-]+:(\s.*)?$")


def _role_text(match: re.Match[str]) -> str:
    """`:func:`~os.path.join`` -> ``join``; `:ref:`text <label>`` -> ``text``."""
    inner = match.group(1)
    inner = re.sub(r"\s*<[^>]*>$", "", inner)
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    return inner.lstrip("!")


def clean_rst(text: str) -> str:
    """Turn reStructuredText into plain-ish prose, keeping code examples."""
    lines = []
    for line in text.splitlines():
        if _ADORNMENT.match(line) or _DIRECTIVE.match(line) or _FIELD.match(line):
            continue
        line = _LITERAL.sub(r"\1", _ROLE.sub(_role_text, line))
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def read_documents(source: Path) -> dict[str, str]:
    """Every ``*.rst.txt`` under ``source`` (a folder or a ``.deb``), cleaned, by relative path.

    Raises ``FileNotFoundError`` when nothing is found.
    """
    if source.suffix == ".deb":
        unpacked = Path(tempfile.mkdtemp(prefix="demo-text-"))
        subprocess.run(["dpkg-deb", "-x", str(source), str(unpacked)], check=True)
        source = unpacked
    docs = {}
    for path in sorted(source.rglob("*.rst.txt")):
        rel = path.as_posix().split("_sources/", 1)[-1]
        if rel not in SKIP_DOCS:
            docs[rel] = clean_rst(path.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise FileNotFoundError(f"no *.rst.txt files under {source}")
    return docs


def is_held_out(name: str) -> bool:
    """Deterministic document-level split."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style), trained on the training documents only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream, each followed by EOS."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)  # (tokens,)


def token_bytes(tok: Tokenizer) -> torch.Tensor:
    """Bytes each token stands for (byte-level BPE: one char per byte); EOS counts as 1."""
    out = torch.ones(tok.get_vocab_size(), dtype=torch.float64)
    for piece, idx in tok.get_vocab().items():
        out[idx] = 1 if piece == EOS else len(piece)
    return out  # (vocab,)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Config:
    """Hyper-parameters, named as in Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 6144
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)  # (batch, seq, 1)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope_tables(cfg: Config, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq, head_dim), laid out as Hugging Face's Llama (halves, not pairs)."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    freqs = torch.outer(torch.arange(seq).float(), inv)  # (seq, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (seq, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (batch, heads, seq, head_dim/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (batch, heads, seq, head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        q = self.q_proj(x).view(b, s, nh, hd).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = self.k_proj(x).view(b, s, nkv, hd).transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
        v = self.v_proj(x).view(b, s, nkv, hd).transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(nh // nkv, dim=1)  # (batch, heads, seq, head_dim)
        v = v.repeat_interleave(nh // nkv, dim=1)  # (batch, heads, seq, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, seq, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, nh * hd))  # (batch, seq, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (batch, seq, hidden)


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)  # (batch, seq, hidden)
        return x + self.mlp(self.post_attention_layernorm(x))  # (batch, seq, hidden)


class Backbone(nn.Module):
    """Holds the ``model.*`` tensors."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]  # (seq, head_dim)
        x = self.model.embed_tokens(ids)  # (batch, seq, hidden)
        for layer in self.model.layers:
            x = layer(x, cos, sin)  # (batch, seq, hidden)
        return self.lm_head(self.model.norm(x))  # (batch, seq, vocab)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under Hugging Face names; ``lm_head`` is left out when tied."""
        sd = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        if self.cfg.tie_word_embeddings:
            sd.pop("lm_head.weight")
        return sd


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1500
    batch_size: int = 8
    seq_len: int = 256
    peak_lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234


def lr_at(step: int, ts: TrainSettings) -> float:
    """Linear warm-up, then cosine decay from ``peak_lr`` to ``min_lr``."""
    if step < ts.warmup_steps:
        return ts.peak_lr * (step + 1) / ts.warmup_steps
    frac = (step - ts.warmup_steps) / max(1, ts.steps - ts.warmup_steps)
    return ts.min_lr + 0.5 * (ts.peak_lr - ts.min_lr) * (1 + math.cos(math.pi * frac))


def batches(
    stream: torch.Tensor, ts: TrainSettings, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Random windows of ``seq_len + 1`` tokens, forever."""
    high = stream.numel() - ts.seq_len - 1
    while True:
        starts = torch.randint(0, high, (ts.batch_size,), generator=gen)
        yield torch.stack([stream[i : i + ts.seq_len + 1] for i in starts.tolist()])


def make_optimizer(model: Llama, ts: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": ts.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=ts.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def train(model: Llama, stream: torch.Tensor, ts: TrainSettings, log: Path) -> float:
    """Runs ``ts.steps`` optimizer steps; returns the wall time in seconds."""
    gen = torch.Generator().manual_seed(ts.seed)
    opt = make_optimizer(model, ts)
    model.train()
    start = time.monotonic()
    data = batches(stream, ts, gen)
    with log.open("a") as fh:
        for step in range(ts.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, ts)
            chunk = next(data)  # (batch, seq + 1)
            logits = model(chunk[:, :-1])  # (batch, seq, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip)
            opt.step()
            if step % 250 == 249:  # lets a cut-short run be evaluated with --eval-only
                save_file(model.hf_state_dict(), str(log.with_suffix(".safetensors")))
            if step % 20 == 0 or step == ts.steps - 1:
                elapsed = time.monotonic() - start
                fh.write(
                    f"step {step} loss {loss.item():.4f} lr {lr_at(step, ts):.2e} "
                    f"t {elapsed:.0f}s\n"
                )
                fh.flush()
    return time.monotonic() - start


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_nll(model: Llama, stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Per-token NLL (nats) of every predicted held-out token, non-overlapping windows."""
    model.eval()
    n = (stream.numel() - 1) // seq_len
    out = []
    for i in range(0, n, 8):
        rows = [stream[j * seq_len : (j + 1) * seq_len + 1] for j in range(i, min(n, i + 8))]
        chunk = torch.stack(rows)  # (rows, seq + 1)
        logits = model(chunk[:, :-1])  # (rows, seq, vocab)
        nll = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
        out.append(nll)
    return torch.cat(out).double()  # (predicted tokens,)


def predicted_targets(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = (stream.numel() - 1) // seq_len
    return torch.cat([stream[j * seq_len + 1 : (j + 1) * seq_len + 1] for j in range(n)])


def unigram_nll(train_stream: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Add-one smoothed unigram model fitted on the training stream."""
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1.0  # (vocab,)
    logp = counts.log() - counts.sum().log()
    return -logp[targets]  # (predicted tokens,)


def summarize(nll: torch.Tensor, targets: torch.Tensor, nbytes: torch.Tensor) -> dict[str, float]:
    total_bytes = float(nbytes[targets].sum())
    return {
        "tokens": float(targets.numel()),
        "bytes": total_bytes,
        "ppl": math.exp(float(nll.mean())),
        "bits_per_byte": float(nll.sum()) / math.log(2) / total_bytes,
    }


@torch.no_grad()
def generate(model: Llama, tok: Tokenizer, prompt: str, n: int, temp: float, seed: int) -> str:
    """Greedy when ``temp == 0``, else top-k 40 sampling at ``temp``; no KV cache (tiny model)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = tok.encode(prompt).ids
    eos = tok.token_to_id(EOS)
    for _ in range(n):
        window = torch.tensor([ids[-model.cfg.max_position_embeddings :]])  # (1, seq)
        logits = model(window)[0, -1]  # (vocab,)
        if temp == 0:
            nxt = int(logits.argmax())
        else:
            top = torch.topk(logits / temp, 40)
            pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
            nxt = int(top.indices[pick])
        if nxt == eos:
            break
        ids.append(nxt)
    return str(tok.decode(ids))


# --------------------------------------------------------------------------- output


def hf_config(cfg: Config, eos_id: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **asdict(cfg),
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "rope_scaling": None,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def write_folder(out: Path, model: Llama, tok: Tokenizer) -> None:
    """config.json, model.safetensors, tokenizer files, generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    eos_id = tok.token_to_id(EOS)
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, eos_id), indent=2) + "\n")
    save_file(model.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.cfg.max_position_embeddings,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen_cfg = {
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 40,
        "max_new_tokens": 64,
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, required=True, help="python3.11-doc .deb or folder")
    parser.add_argument("--out", type=Path, required=True, help="output Hugging Face folder")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--log", type=Path, default=Path("/tmp/train_demo_model.log"))
    parser.add_argument("--eval-only", action="store_true", help="load --out, skip training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ts = TrainSettings(steps=args.steps)
    torch.manual_seed(ts.seed)
    run(args, ts)


def run(args: argparse.Namespace, ts: TrainSettings) -> None:
    docs = read_documents(args.text)
    train_docs = [t for n, t in docs.items() if not is_held_out(n)]
    held_docs = [t for n, t in docs.items() if is_held_out(n)]
    cfg = Config()
    if args.eval_only:
        tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    else:
        tok = train_tokenizer(train_docs, cfg.vocab_size)
    train_stream, held_stream = encode_stream(tok, train_docs), encode_stream(tok, held_docs)
    info = {
        "documents": len(docs),
        "held_out_documents": len(held_docs),
        "train_tokens": train_stream.numel(),
        "held_out_tokens": held_stream.numel(),
        "train_bytes": sum(len(d.encode()) for d in train_docs),
    }
    log(args.log, f"data {info}")
    model = Llama(cfg)
    if args.eval_only:
        sd = load_file(str(args.out / "model.safetensors"))
        model.load_state_dict(sd, strict=False)
        seconds = float("nan")
    else:
        seconds = train(model, train_stream, ts, args.log)
        write_folder(args.out, model, tok)
    report = evaluate(model, tok, train_stream, held_stream, ts)
    report.update(info=info, seconds=seconds, params=sum(p.numel() for p in model.parameters()))
    log(args.log, json.dumps(report, indent=2))
    (args.out / "README.md").write_text(model_card(cfg, ts, report))


def evaluate(
    model: Llama,
    tok: Tokenizer,
    train_stream: torch.Tensor,
    held_stream: torch.Tensor,
    ts: TrainSettings,
) -> dict[str, object]:
    targets = predicted_targets(held_stream, ts.seq_len)
    nbytes = token_bytes(tok)
    model_nll = heldout_nll(model, held_stream, ts.seq_len)
    uni_nll = unigram_nll(train_stream, targets, tok.get_vocab_size())
    samples = []
    for i, prompt in enumerate(PROMPTS):
        samples.append(
            {
                "prompt": prompt,
                "mode": "greedy",
                "text": generate(model, tok, prompt, 48, 0.0, ts.seed),
            }
        )
        samples.append(
            {
                "prompt": prompt,
                "mode": "sampled (T=0.8, top-k 40)",
                "text": generate(model, tok, prompt, 48, 0.8, ts.seed + i),
            }
        )
    return {
        "model": summarize(model_nll, targets, nbytes),
        "unigram": summarize(uni_nll, targets, nbytes),
        "samples": samples,
    }


def log(path: Path, line: str) -> None:
    with path.open("a") as fh:
        fh.write(line + "\n")


def model_card(cfg: Config, ts: TrainSettings, r: dict[str, object]) -> str:
    """The README.md written next to the weights."""
    m, u, info = r["model"], r["unigram"], r["info"]
    assert isinstance(m, dict) and isinstance(u, dict) and isinstance(info, dict)
    samples = r["samples"]
    assert isinstance(samples, list)
    tokens_seen = ts.steps * ts.batch_size * ts.seq_len
    sample_md = "\n\n".join(
        f"**{s['mode']}**, prompt `{s['prompt']}`:\n\n```text\n{s['text']}\n```" for s in samples
    )
    return CARD.format(
        params=r["params"],
        cfg=json.dumps(asdict(cfg), indent=2),
        ts=ts,
        tokens_seen=tokens_seen,
        minutes=float(r["seconds"]) / 60,
        info=info,
        m_ppl=m["ppl"],
        m_bpb=m["bits_per_byte"],
        u_ppl=u["ppl"],
        u_bpb=u["bits_per_byte"],
        eval_tokens=int(m["tokens"]),
        eval_bytes=int(m["bytes"]),
        samples=sample_md,
        epochs=tokens_seen / info["train_tokens"],
        every=HELD_OUT_EVERY,
    )


CARD = """\
# swarm-demo

A tiny Llama-architecture language model ({params:,} parameters, float32) bundled with
`swarm` so that the demo runs offline. It writes text that looks like the Python
documentation; it knows little and is often wrong. It is a demo, not an assistant.

## Text and license

Trained on the reStructuredText sources of the Python 3.11 documentation as shipped in
Debian 12's `python3.11-doc` package (`/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`,
{info[documents]} documents, `whatsnew/changelog` left out), lightly cleaned of reST markup
by the training script. The documentation is © Python Software Foundation and distributed
under the PSF License Agreement (Python Software Foundation License Version 2); see the
package's `/usr/share/doc/python3.11-doc/copyright`. The model weights are derived from it.

Train / held-out split: by document, one in {every} by a hash of its path
({info[held_out_documents]} held-out documents, {info[held_out_tokens]:,} tokens;
{info[train_tokens]:,} training tokens, {info[train_bytes]:,} bytes).

## Model

`LlamaForCausalLM`: RMSNorm, SwiGLU, RoPE, grouped-query attention, tied embeddings.
Byte-level BPE tokenizer trained with `tokenizers` on the training split; `<|endoftext|>`
(id 0) separates documents and is BOS/EOS/PAD.

```json
{cfg}
```

## Training

Reproduce (Debian 12, one CPU thread):

```sh
apt-get download python3.11-doc
OMP_NUM_THREADS=1 python examples/train_demo_model.py \\
    --text python3.11-doc_*.deb --out swarm/assets/models/swarm-demo
```

- seed {ts.seed}; {ts.steps} steps of batch {ts.batch_size} x {ts.seq_len} tokens
  = {tokens_seen:,} tokens seen (about {epochs:.2f} epochs)
- AdamW (β = 0.9, 0.95; weight decay {ts.weight_decay} on matrices), gradient clip
  {ts.grad_clip}, learning rate warm-up over {ts.warmup_steps} steps to {ts.peak_lr},
  cosine decay to {ts.min_lr}
- wall time {minutes:.1f} minutes, one thread (`torch.set_num_threads(1)`), on a shared
  2-core machine

## Results on the held-out split

{eval_tokens:,} predicted tokens ({eval_bytes:,} bytes; `<|endoftext|>` counted as one byte),
non-overlapping windows of {ts.seq_len} tokens.

| model | perplexity per token | bits per byte |
| --- | ---: | ---: |
| this model | {m_ppl:.2f} | {m_bpb:.3f} |
| unigram baseline (add-one, fitted on the training split) | {u_ppl:.1f} | {u_bpb:.3f} |

## Samples

48 new tokens at most, from the script (no KV cache), seeded.

{samples}
"""


if __name__ == "__main__":
    main()
