"""Attribute accuracy on the demo corpus: does a generated clip have the attributes its caption asked for?

One multinomial logistic regression per attribute (instrument family, register, pattern,
sound kind, …) is fitted on embeddings of real clips; applied to generated clips of
held-out captions, its accuracy against the captions' attributes says whether the model
follows the text. Each accuracy comes with its chance level: the accuracy of always
answering the training set's most frequent class.

Rows whose label is missing (``None``, or NaN as a Parquet round trip may give it: an
attribute that does not apply, a siren has no register) are left out of that attribute's
fit and score. Labels are compared as strings.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

Labels = Mapping[str, Sequence[str | None]]


class AttributeClassifiers(nn.Module):
    """Linear softmax classifiers over standardised embeddings, one per attribute.

    Args:
        dim: embedding width.
        classes: ``attribute -> class names`` (the logit order).
        majority: ``attribute -> most frequent training class`` (the chance baseline).
    """

    def __init__(self, dim: int, classes: Mapping[str, Sequence[str]], majority: Mapping[str, str]):
        super().__init__()
        self.classes = {a: list(c) for a, c in classes.items()}
        self.majority = dict(majority)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.heads = nn.ModuleDict({a: nn.Linear(dim, len(c)) for a, c in self.classes.items()})

    def logits(self, emb: Tensor, attribute: str) -> Tensor:
        """(N, dim) → (N, K) logits of one attribute."""
        return self.heads[attribute]((torch.as_tensor(emb).float() - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, emb: Tensor) -> dict[str, list[str]]:
        """The predicted class name of every row, per attribute."""
        return {a: [self.classes[a][i] for i in self.logits(emb, a).argmax(1).tolist()] for a in self.heads}

    def save(self, path: str | os.PathLike) -> None:
        # One sorted-JSON entry: several entries are written in hash-map order (varying bytes).
        meta = {"lafma": json.dumps({"classes": self.classes, "majority": self.majority}, sort_keys=True)}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, os.fspath(path),
                  metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttributeClassifiers:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = json.loads(f.metadata()["lafma"])
        state = load_file(os.fspath(path))
        model = cls(state["mean"].shape[0], meta["classes"], meta["majority"])
        model.load_state_dict(state)
        return model.eval()


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ == "NAType"


def _rows(labels: Sequence[str | None]) -> tuple[list[int], list[str]]:
    """Indices of the rows that have a label, and those labels as strings."""
    keep = [i for i, v in enumerate(labels) if not _missing(v)]
    return keep, [str(labels[i]) for i in keep]


def fit_attribute_classifiers(emb: Tensor, labels: Labels, *, l2: float = 1e-2,
                              max_iter: int = 200) -> AttributeClassifiers:
    """Fit one L2-regularised multinomial logistic regression per attribute.

    The problem is convex and starts from zero weights, and L-BFGS runs full-batch, so the
    result is deterministic without a seed.

    Args:
        emb: (N, D) embeddings of real clips.
        labels: ``attribute -> N labels`` (``None`` where the attribute does not apply).
        l2: weight-decay strength on the weights (not the biases).
        max_iter: L-BFGS iterations per attribute.

    Returns:
        The fitted classifiers, in eval mode.
    """
    x = torch.as_tensor(emb).float().cpu()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) embeddings, got {tuple(x.shape)}")
    classes, majority = {}, {}
    for attr, values in labels.items():
        if len(values) != x.shape[0]:
            raise ValueError(f"{attr}: {len(values)} labels for {x.shape[0]} embeddings")
        _, names = _rows(values)
        if not names:
            raise ValueError(f"{attr}: every label is missing")
        counts = Counter(names)
        classes[attr] = sorted(counts)
        majority[attr] = max(sorted(counts), key=counts.__getitem__)
    model = AttributeClassifiers(x.shape[1], classes, majority)
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-6))
    for attr, values in labels.items():
        keep, names = _rows(values)
        index = {c: i for i, c in enumerate(classes[attr])}
        y = torch.tensor([index[v] for v in names])
        head = model.heads[attr]
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        xs = x[keep]
        opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure(attr=attr, xs=xs, y=y, head=head, opt=opt):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model.logits(xs, attr), y) + l2 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def attribute_accuracy(classifiers: AttributeClassifiers, emb: Tensor,
                       labels: Labels) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy of the classifiers on ``emb`` against ``labels``.

    Args:
        classifiers: from :func:`fit_attribute_classifiers`.
        emb: (N, D) embeddings (e.g. of generated clips).
        labels: ``attribute -> N labels`` the clips should have (their captions' attributes).

    Returns:
        ``attribute -> {"accuracy", "chance", "uniform_chance", "n"}``: ``chance`` is the
        accuracy of always answering the training majority class, ``uniform_chance`` is
        1 / number of classes, ``n`` the rows scored. A class never seen in training can
        never be predicted and counts as wrong.
    """
    x = torch.as_tensor(emb).float().cpu()
    out = {}
    for attr, values in labels.items():
        if attr not in classifiers.heads:
            raise KeyError(f"no classifier for attribute {attr!r}; have {sorted(classifiers.heads)}")
        if len(values) != x.shape[0]:
            raise ValueError(f"{attr}: {len(values)} labels for {x.shape[0]} embeddings")
        keep, names = _rows(values)
        if not keep:
            continue
        pred = classifiers.logits(x[keep], attr).argmax(1).tolist()
        hits = sum(classifiers.classes[attr][p] == v for p, v in zip(pred, names))
        out[attr] = {
            "accuracy": hits / len(keep),
            "chance": sum(v == classifiers.majority[attr] for v in names) / len(keep),
            "uniform_chance": 1.0 / len(classifiers.classes[attr]),
            "n": float(len(keep)),
        }
    return out
