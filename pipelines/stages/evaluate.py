"""Stage ``evaluate``: generate the held-out captions with the candidate, score them against
the held-out real audio, log everything to MLflow and hand the gate metric to promotion.

Every number is labelled with the embedder that measured it (name and SHA-256 of its
weights). Reference rows make the scale readable: real vs real (two halves of the held-out
set), the vocoder's rendering of real mels, and the VAE + vocoder round trip of real mels.
A spectrogram sheet puts a few held-out captions' generated clips beside a real clip of each
caption and that clip's VAE + vocoder round trip; an edits sheet shows a few of those real clips
inpainted and continued with their own caption (training-free, :meth:`LafmaPipeline.generate`'s
``regenerate``), the regenerated seconds marked.

What a reader needs to recompute every number stays in the stage's output: the generated
clips (``generated/manifest.parquet``: id → wav), and ``metrics.json``, which beside the
metrics records the held-out ids in the order every paired set was scored (row i of the
generated, the real and the caption sets is clip ``ids[i]``) and the ids of the two halves
``eval/fd_half`` and ``ref/real_vs_real/fd`` compare.

The text-audio projection it fits is saved as a scorer (``scorer/``, :mod:`pipelines.scoring`)
and the model version is tagged with its URI: best-of-N generation ranks candidates with it.
"""

from __future__ import annotations

import heapq
import io
import json
import os
import time

import numpy as np
import pyarrow as pa
import torch

from lafma.config import MelConfig
from lafma.data.captions import derive_seed, safe_name
from lafma.metrics import Embedded, frechet_distance_from_embeddings, score_generations
from lafma.pipeline import Generation, LafmaPipeline
from pipelines.config import PipelineConfig
from pipelines.core import registry, storage
from pipelines.core.stage import Stage, StageContext, read_marker
from pipelines.stages.ingest import MIN_HELD_OUT
from pipelines.stages.release import generation_actors, packaged_model_uri
from pipelines.stages.text import caption_key

HELD_OUT = ("test", "validation")
# Clips per embedder call: bounds one forward pass's memory (embedders resample to up to
# 48 kHz first: 16 ten-second clips are ~30 MB of input before any activation) while keeping
# the per-call overhead small.
EMBED_BATCH = 16
# Training clips (first by id) the text-audio projection and the attribute classifiers are
# fitted on: linear models over frozen embeddings, which a thousand examples fit well; more
# would only lengthen loading and embedding them.
TRAIN_CLIPS = 1024
# Audio-stage rows read at a time while loading clips: a batch of waveforms and mels (about
# 1 MB a row for ten-second clips) beside the clips already chosen.
CLIP_BATCH = 16
LOGGED_CLIPS = 64  # generated held-out clips whose audio is logged to MLflow
# Held-out clips drawn in the spectrogram sheet: rows enough to see a pattern, few enough
# that the sheet stays one image a reader takes in at once.
SHEET_ROWS = 8
# The edits sheet: its first EDIT_ROWS sheet clips, each inpainted over this share of its length
# (a middle region: kept audio on both sides to join) and continued from this share on (the
# first part kept, the rest generated after it).
EDIT_ROWS = 3
INPAINT = (0.25, 0.6)
CONTINUE_FROM = 0.5
# Higher is better only for the text-audio score.
HIGHER_IS_BETTER = {"text_audio"}
# A manifest column is scored as an attribute (a classifier fitted on real training clips,
# its accuracy on generated held-out clips) when it reads as a class label: text or integer
# values, at least two classes, and on average at least this many training clips per class
# (an id, a URL or a free-text note has about one value per clip and would only measure noise).
MIN_CLIPS_PER_CLASS = 2


def load_clips(audio_dir: str, splits: tuple[str, ...], limit: int) -> list[dict]:
    """Clips of ``splits`` from the audio stage (first ``limit`` by id), with their waveform,
    mel (n_mels, T) and attributes.

    Two passes, so the driver never holds the whole table: ids and splits first, to choose the
    clips, then the chosen rows' audio, a batch of rows at a time.
    """
    files = storage.list_files(audio_dir, ".parquet")

    def candidates():  # (id, file, row) of every clip of ``splits``, in file and row order
        for f, uri in enumerate(files):
            row = 0
            for batch in storage.iter_parquet_batches(uri, ["id", "split"], batch_size=4096):
                for rid, split in zip(batch.column("id").to_pylist(), batch.column("split").to_pylist()):
                    if split in splits:
                        yield rid, f, row
                    row += 1

    # nsmallest is sorted(...)[:limit] (stable: equal ids keep file and row order) holding only
    # ``limit`` candidates at a time.
    chosen = heapq.nsmallest(limit, candidates(), key=lambda t: t[0])
    wanted: dict[int, dict[int, int]] = {}  # file -> {row in the file: position in the result}
    for pos, (_, f, row) in enumerate(chosen):
        wanted.setdefault(f, {})[row] = pos
    out: list = [None] * len(chosen)  # every chosen row is filled in from its file below
    cols = ["id", "caption", "split", "attributes", "waveform", "mel", "n_mels", "frames"]
    for f, rows in sorted(wanted.items()):
        start = 0
        for batch in storage.iter_parquet_batches(files[f], cols, batch_size=CLIP_BATCH):
            take = [i for i in range(batch.num_rows) if start + i in rows]
            for i, r in zip(take, batch.take(pa.array(take, pa.int64())).to_pylist()):
                out[rows[start + i]] = {"id": r["id"], "caption": r["caption"], "split": r["split"],
                                        "attributes": json.loads(r["attributes"] or "{}"),
                                        "waveform": np.asarray(r["waveform"], np.float32),
                                        "mel": np.asarray(r["mel"], np.float32).reshape(r["n_mels"], r["frames"])}
            start += batch.num_rows
    return out


def caption_embeddings(text_dir: str, captions: list[str]) -> np.ndarray:
    """(N, D) mean-pooled token embeddings of ``captions`` from the text stage's table."""
    wanted = {caption_key(c) for c in captions}
    pooled: dict[str, np.ndarray] = {}
    for uri in storage.list_files(text_dir, ".parquet"):
        t = storage.read_parquet_file(uri, ["caption_key", "emb", "length"])
        for key, emb, n in zip(t.column("caption_key").to_pylist(), t.column("emb").to_numpy(zero_copy_only=False),
                               t.column("length").to_pylist()):
            if key in wanted:
                e = np.asarray(emb, np.float32).reshape(n, -1)  # (L·D,) -> (L, D): only real tokens are stored
                pooled[key] = e.mean(0)
    return np.stack([pooled[caption_key(c)] for c in captions])


def evaluation_embedder(cfg: PipelineConfig, root: str):
    from lafma.metrics.embedders import build_embedder as build
    from lafma.metrics.embedders.aisfx import ensure_aisfx_weights

    e = cfg.evaluate
    if e.embedder == "aisfx":
        cache = os.path.join(root if not storage.is_remote(root) else os.path.expanduser("~/.cache/lafma"), "weights")
        os.makedirs(cache, exist_ok=True)
        return build("aisfx", ensure_aisfx_weights(cache)).eval()
    kwargs = {"pca_params": e.vggish_pca or None} if e.embedder == "vggish" else {}
    return build(e.embedder, e.embedder_weights, **kwargs).eval()


@torch.no_grad()
def embed(embedder, waves: list[np.ndarray], sample_rate: int) -> Embedded:
    """The FD rows, clip embeddings and (with a classifier head) logits of ``waves``."""
    feats, embs, logits = [], [], []
    for start in range(0, len(waves), EMBED_BATCH):
        x = torch.from_numpy(np.stack(waves[start : start + EMBED_BATCH]))  # (B, N)
        if embedder.num_classes:
            emb, logit = embedder.embed_and_classify(x, sample_rate)
            logits.append(logit.numpy())
        else:
            emb = embedder.embed(x, sample_rate)
        embs.append(emb.numpy())
        # A clip-level embedder's FD rows are its clip embeddings (fd_features would run the
        # network a second time to get the same numbers); a frame-level one's are its frames.
        feats.append(embs[-1] if embedder.fd_unit == "clip" else embedder.fd_features(x, sample_rate).numpy())
    return Embedded(np.concatenate(feats), np.concatenate(embs), np.concatenate(logits) if logits else None)


def sheet_rows(held: list[dict], n: int = SHEET_ROWS) -> list[int]:
    """Indices of the ``n`` clips of ``held`` the spectrogram sheet draws: the first clip of each
    caption in ``held`` order (by id: the same clips every run), then its repeats if too few."""
    seen: set[str] = set()
    first, again = [], []
    for i, c in enumerate(held):
        (again if c["caption"] in seen else first).append(i)
        seen.add(c["caption"])
    return (first + again)[:n]


def waveform_mel(mel_cfg: MelConfig):
    """``mel(wav: (N,)) -> (n_mels, N // hop)``: the one transform every sheet draws waveforms
    with, so their panels compare (the stored real mel is that transform of its waveform)."""
    from lafma.audio.mel import MelSpectrogram

    to_mel = MelSpectrogram.from_config(mel_cfg)

    @torch.no_grad()
    def mel(wav: np.ndarray) -> torch.Tensor:
        return to_mel(torch.from_numpy(np.ascontiguousarray(wav, np.float32)))  # (N,) -> (n_mels, N // hop)

    return mel


def spectrogram_sheet(mel_cfg: MelConfig, held: list[dict], gen: list[np.ndarray],
                      roundtrip: list[np.ndarray]) -> bytes:
    """PNG: a row per :func:`sheet_rows` clip, titled with its caption: the generated clip, the
    real clip and its VAE + vocoder round trip, all mels of waveforms (:func:`waveform_mel`)."""
    from pipelines.core.tracking import mel_grid

    mel = waveform_mel(mel_cfg)
    rows = []
    for i in sheet_rows(held):
        c = held[i]
        rows.append((c["caption"][:120], [("generated", mel(gen[i])), (f"real: {c['id']}", mel(c["waveform"])),
                                          ("VAE + vocoder round trip", mel(roundtrip[i]))]))
    return mel_grid(rows, sample_rate=mel_cfg.sample_rate, hop_length=mel_cfg.hop_length)


def edit_regions(duration: float) -> dict[str, tuple[float, float]]:
    """Seconds each edit of a ``duration``-second clip regenerates: ``inpaint`` (:data:`INPAINT`
    of it) and ``continue`` (from :data:`CONTINUE_FROM` of it to its end)."""
    return {"inpaint": (INPAINT[0] * duration, INPAINT[1] * duration), "continue": (CONTINUE_FROM * duration, duration)}


def edit_examples(pipe: LafmaPipeline, clips: list[dict], seeds: list[int], *, duration: float, steps: int,
                  guidance: float, solver: str) -> dict[str, Generation]:
    """``clips`` (their ``waveform`` and ``caption``) inpainted and continued over
    :func:`edit_regions`, each with its own caption and seed, by ``pipe``.

    Continuation is inpainting of what lies past the input's end: the model is given only the
    clip's first part (``duration`` pads it with silence) and generates the rest after it.

    Returns:
        ``{"inpaint": Generation, "continue": Generation}``, each with (B, duration · sample_rate)
        audio in ``clips`` order.
    """
    regions = edit_regions(duration)
    captions = [c["caption"] for c in clips]
    wave = torch.from_numpy(np.stack([c["waveform"] for c in clips]))  # (B, N)
    head = wave[:, : round(regions["continue"][0] * pipe.sample_rate)]  # (B, N_kept): the part continued
    kwargs = dict(seeds=seeds, steps=steps, guidance=guidance, solver=solver, duration=duration)
    return {"inpaint": pipe.generate(captions, audio=wave, regenerate=regions["inpaint"], **kwargs),
            "continue": pipe.generate(captions, audio=head, regenerate=regions["continue"], **kwargs)}


def edits_sheet(mel_cfg: MelConfig, clips: list[dict], edits: dict[str, Generation], duration: float) -> bytes:
    """PNG: a row per clip of :func:`edit_examples`, titled with its caption: the input clip, its
    inpainting and its continuation, the regenerated seconds between dashed lines."""
    from pipelines.core.tracking import mel_grid

    mel, regions = waveform_mel(mel_cfg), edit_regions(duration)
    (a, b), (c0, _) = regions["inpaint"], regions["continue"]
    rows = []
    for i, c in enumerate(clips):
        rows.append((c["caption"][:120], [
            (f"input: {c['id']}", mel(c["waveform"])),
            (f"inpainted {a:.2f}-{b:.2f} s", mel(edits["inpaint"].audio[i].numpy()), regions["inpaint"]),
            (f"continued from {c0:.2f} s", mel(edits["continue"].audio[i].numpy()), regions["continue"])]))
    return mel_grid(rows, sample_rate=mel_cfg.sample_rate, hop_length=mel_cfg.hop_length)


def attribute_names(train: list[dict]) -> list[str]:
    """The manifest columns that read as class labels (:data:`MIN_CLIPS_PER_CLASS`) in the
    training clips."""
    values: dict[str, set] = {}
    for c in train:
        for k, v in c["attributes"].items():
            values.setdefault(k, set()).add(v if isinstance(v, (str, int)) and not isinstance(v, bool) else None)
    return sorted(k for k, vs in values.items() if None not in vs and 2 <= len(vs) <= len(train) / MIN_CLIPS_PER_CLASS)


def log_table(client, run_id: str, table, artifact_file: str) -> None:
    """``client.log_table``, replacing the table if the run has it already.

    MLflow appends to a table logged before under the same name; a re-run of the stage (after
    a kill, it logs into the same run) would then list every clip twice. The second time the
    file is overwritten in MLflow's own format (``to_json(orient="split")``), and stays the
    table the first call registered.
    """
    folder = os.path.dirname(artifact_file) or None
    if artifact_file not in {a.path for a in client.list_artifacts(run_id, folder)}:
        client.log_table(run_id, table, artifact_file)
        return
    client.log_text(run_id, table.to_json(orient="split", index=False, date_format="iso"), artifact_file)


class EvaluateStage(Stage):
    """Generate the held-out captions with the candidate, score them against the held-out real
    audio (see the module docstring) and hand the gate metric to the registry."""

    name = "evaluate"
    needs = ("ingest", "audio", "text", "package")

    def key(self, ctx: StageContext) -> dict:
        return {**{n: ctx.hashes[n] for n in self.needs}, "evaluate": ctx.cfg.evaluate, "sampler": ctx.cfg.sampler}

    def resources(self, ctx: StageContext) -> list:
        return [generation_actors(ctx)]

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        cfg, e, s = ctx.cfg, ctx.cfg.evaluate, ctx.cfg.sampler
        pkg = read_marker(ctx.outputs["package"])
        held = load_clips(ctx.outputs["audio"], HELD_OUT, e.max_clips)
        if len(held) < MIN_HELD_OUT:
            raise ValueError(f"evaluate needs at least {MIN_HELD_OUT} held-out clips ({'/'.join(HELD_OUT)} splits); "
                             f"found {len(held)}: set data.splits=hash, or raise data.heldout_fraction")
        train = load_clips(ctx.outputs["audio"], ("train",), TRAIN_CLIPS)
        sr = cfg.mel.sample_rate
        embedder = evaluation_embedder(cfg, ctx.root)
        print(f"[evaluate] {len(held)} held-out clips, {len(train)} training clips; embedder {embedder.name}", flush=True)

        gen, seconds_per_clip = self._generate(ctx, held, out_dir, "generated", s.steps, pkg)
        real = embed(embedder, [c["waveform"] for c in held], sr)
        pipe = registry.load_pipeline(packaged_model_uri(pkg), root=ctx.root, device="cpu")
        vocoded, roundtrip = self._back_end(ctx, held, pipe)
        captions = [c["caption"] for c in train]
        text = caption_embeddings(ctx.outputs["text"], captions + [c["caption"] for c in held])  # one pass
        names = attribute_names(train)
        scores = score_generations(
            real, embed(embedder, gen, sr), train=embed(embedder, [c["waveform"] for c in train], sr).clips,
            train_text=text[: len(train)], train_captions=captions, held_text=text[len(train) :],
            train_labels={a: [c["attributes"].get(a) for c in train] for a in names},
            held_labels={a: [c["attributes"].get(a) for c in held] for a in names},
            references={"vocoder": embed(embedder, vocoded, sr).fd, "vae_vocoder": embed(embedder, roundtrip, sr).fd},
            seed=e.seed)
        sweep = self._sweep(ctx, held, out_dir, embedder, real.fd, pkg) if e.sweep_steps else {}

        flat = scores.metrics | {"eval/seconds_per_clip": seconds_per_clip}
        gate_value = flat[f"eval/{e.gate_metric}"]
        gate_name = f"{e.gate_metric}/{embedder.name}"
        registry.set_gate(pkg["model_version"], root=ctx.root, metric=gate_name, value=gate_value,
                          lower_is_better=e.gate_metric not in HIGHER_IS_BETTER)
        scorer = self._save_scorer(ctx, out_dir, scores, embedder, pkg, len(train))
        sheet, edits = storage.join(out_dir, "spectrograms.png"), storage.join(out_dir, "edits.png")
        storage.write_bytes(sheet, png := spectrogram_sheet(cfg.mel, held, gen, roundtrip))
        storage.write_bytes(edits, edits_png := self._edits(ctx, held, pipe))
        self._log(ctx, held, gen, scores, flat, embedder, sweep, out_dir,
                  {"eval/spectrograms.png": png, "eval/edits.png": edits_png})
        print("[evaluate] " + ", ".join(f"{k} {v:.4g}" for k, v in flat.items()), flush=True)
        return {"rows": len(held), "embedder": embedder.describe(), "metrics": flat, "gate_metric": gate_name,
                "gate_value": gate_value, "model_version": pkg["model_version"], "sweep": sweep,
                "spectrograms": sheet, "edits": edits, "scorer": scorer}

    def summary(self, info: dict) -> list[str]:
        """The headline numbers beside their references, the attribute accuracies and the
        sheets' paths."""
        if "metrics" not in info:
            return []
        m, nan = info["metrics"], float("nan")
        lines = [f"{info.get('embedder', {}).get('embedder', '')}: FD {m.get('eval/fd', nan):.4g} "
                 f"(real vs real {m.get('ref/real_vs_real/fd', nan):.4g}, same-size generated "
                 f"{m.get('eval/fd_half', nan):.4g}), text-audio {m.get('eval/text_audio', nan):.3f}"]
        attrs = [f"{k.split('/')[1]} {v:.2f}" for k, v in m.items() if k.startswith("attr/") and k.endswith("/accuracy")]
        if attrs:
            lines.append("attribute accuracy on held-out captions: " + ", ".join(attrs))
        else:
            lines.append("no attribute accuracy: the manifest has no attribute columns (class labels beside "
                         "audio and caption, e.g. a 'category' column)")
        if "spectrograms" in info:
            lines.append(f"spectrogram sheet: {info['spectrograms']}")
        if "edits" in info:
            lines.append(f"inpainting and continuation sheet: {info['edits']}")
        return lines

    def _save_scorer(self, ctx: StageContext, out_dir: str, scores, embedder, pkg: dict, train_clips: int) -> str:
        """The fitted text-audio projection as a scorer folder (what best-of-N generation ranks
        candidates with), its URI recorded on the model version."""
        from pipelines.scoring import (
            bundle_config,
            default_weights_dir,
            save_projection_scorer,
            tag_scorer,
        )

        e = ctx.cfg.evaluate
        uri = save_projection_scorer(
            storage.join(out_dir, "scorer"), projection=scores.projection, embedder=embedder, embedder_kind=e.embedder,
            embedder_weights=e.embedder_weights or default_weights_dir(ctx.root),
            embedder_extra={"pca_params": e.vggish_pca or None} if e.embedder == "vggish" else None,
            # The caption embeddings it was fitted on are the text stage's, made by the model's own encoder.
            text_config=bundle_config(ctx.outputs["package"])["text"],
            fitted_on={"audio": ctx.outputs["audio"], "text": ctx.outputs["text"], "train_clips": train_clips,
                       "seed": e.seed})
        tag_scorer(pkg["model_version"], uri, root=ctx.root)
        return uri

    def _generate(self, ctx: StageContext, held: list[dict], out_dir: str, name: str, steps: int,
                  pkg: dict) -> tuple[list[np.ndarray], float]:
        """The held-out captions through batch generation (resumable); waveforms in ``held`` order."""
        import soundfile as sf

        from pipelines.generation import GenerationSettings, run_generation

        g, s, e = ctx.cfg.generate, ctx.cfg.sampler, ctx.cfg.evaluate
        out = storage.join(out_dir, name)
        captions = storage.join(out, "captions.jsonl")
        lines = "".join(json.dumps({"id": c["id"], "caption": c["caption"], "seed": derive_seed(e.seed, c["id"])}) + "\n"
                        for c in held)
        storage.write_bytes(captions, lines.encode())
        settings = GenerationSettings(model=packaged_model_uri(pkg), steps=steps, guidance=s.guidance, solver=s.solver,
                                      duration=ctx.cfg.audio.clip_seconds, seed=e.seed, batch_size=g.batch_size,
                                      actors=g.actors, actor_cpus=g.actor_cpus, actor_gpus=g.actor_gpus)
        t0 = time.time()
        run_generation(captions, out, settings, root=ctx.root, defaults={"steps": steps, "guidance": s.guidance,
                                                                          "solver": s.solver, "duration": s.duration})
        wall = time.time() - t0
        rows = {r["id"]: r for r in storage.read_parquet_file(storage.join(out, "manifest.parquet")).to_pylist()}
        waves = []
        for c in held:
            wav, _ = sf.read(io.BytesIO(storage.read_bytes(storage.join(out, rows[c["id"]]["path"]))), dtype="float32")
            waves.append(wav)
        per_clip = float(np.mean([r["seconds"] for r in rows.values()]))
        return waves, per_clip if per_clip > 0 else wall / len(held)

    def _back_end(self, ctx: StageContext, held: list[dict],
                  pipe: LafmaPipeline) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """What the generator's back end alone loses: the held-out real mels through the
        vocoder, and through the VAE round trip and the vocoder."""
        # Each clip's own seed for Griffin-Lim's random phase: the references are the same in
        # every run, whatever else the driver drew before.
        seeds = [derive_seed(ctx.cfg.evaluate.seed, c["id"]) for c in held]
        with torch.no_grad():
            mel = torch.from_numpy(np.stack([c["mel"] for c in held]))  # (N, n_mels, T)
            vocoded = [w.numpy() for w in pipe.vocode(mel, seeds)]
            roundtrip = [w.numpy() for w in pipe.vocode(pipe.vae.decode(pipe.vae.encode(mel).mean), seeds)]
        return vocoded, roundtrip

    def _edits(self, ctx: StageContext, held: list[dict], pipe: LafmaPipeline) -> bytes:
        """The edits sheet (:func:`edits_sheet`) of the first :data:`EDIT_ROWS` sheet clips, at the
        sampler's settings and each clip's own seed, so every run draws the same sheet."""
        from lafma.flow.solvers import TABLEAUX

        s, e = ctx.cfg.sampler, ctx.cfg.evaluate
        clips = [held[i] for i in sheet_rows(held, EDIT_ROWS)]
        duration = ctx.cfg.audio.clip_seconds
        # Regenerating part of a clip needs a fixed-step solver; an adaptive sampler's sheet uses Euler.
        solver = s.solver if s.solver in TABLEAUX else "euler"
        t0 = time.time()
        edits = edit_examples(pipe, clips, [derive_seed(e.seed, c["id"]) for c in clips], duration=duration,
                              steps=s.steps, guidance=s.guidance, solver=solver)
        print(f"[evaluate] {len(clips)} clips inpainted and continued in {time.time() - t0:.1f} s", flush=True)
        return edits_sheet(ctx.cfg.mel, clips, edits, duration)

    def _sweep(self, ctx, held, out_dir, embedder, real_fd, pkg) -> dict:
        """FD and time per clip at each of ``evaluate.sweep_steps`` (the paper: ~10 steps suffice)."""
        out = {}
        for steps in ctx.cfg.evaluate.sweep_steps:
            waves, seconds = self._generate(ctx, held, out_dir, f"sweep/steps-{steps:04d}", steps, pkg)
            fd = frechet_distance_from_embeddings(embed(embedder, waves, ctx.cfg.mel.sample_rate).fd, real_fd)
            out[steps] = {"fd": fd, "seconds_per_clip": seconds}
            print(f"[evaluate] {steps} steps: fd {out[steps]['fd']:.4g}, {seconds:.3f} s/clip", flush=True)
        return out

    def _log(self, ctx, held, gen, scores, flat, embedder, sweep, out_dir, sheets: dict[str, bytes]) -> None:
        import pandas as pd
        from mlflow import MlflowClient

        from pipelines.core.tracking import RunLogger, tracking_uri

        ids = [c["id"] for c in held]
        first, second = scores.halves
        storage.write_json(storage.join(out_dir, "metrics.json"), {
            "metrics": flat, "sweep": sweep, "embedder": embedder.describe(), "ids": ids,
            # eval/fd_half: generated clips of "first" against real clips of "second";
            # ref/real_vs_real/fd: real clips of "first" against real clips of "second".
            "halves": {"first": [ids[i] for i in first], "second": [ids[i] for i in second]}})
        run_id = ctx.run_ids.get(self.name)
        logger = RunLogger(run_id, tracking=tracking_uri(ctx.root))
        if not logger.enabled:
            return
        logger.log_metrics(flat, step=0)
        for path, png in sheets.items():
            logger.log_image(png, path)
        logger.set_tags({f"lafma.{k}": v for k, v in embedder.describe().items()})
        # The first LOGGED_CLIPS clips' audio goes to MLflow (the table points at it); the
        # table points every other row at its file in the stage's output.
        audio = [f"eval/generated/{safe_name(c['id'])}.wav" if i < LOGGED_CLIPS else
                 storage.join(out_dir, "generated", "wavs", f"{safe_name(c['id'])}.wav") for i, c in enumerate(held)]
        table = pd.DataFrame({"id": [c["id"] for c in held], "caption": [c["caption"] for c in held],
                              "split": [c["split"] for c in held], "text_audio": scores.text_audio_per_clip.astype(float),
                              "audio": audio})
        log_table(MlflowClient(tracking_uri(ctx.root)), run_id, table, "eval/clips.json")
        for path, wav in list(zip(audio, gen))[:LOGGED_CLIPS]:
            logger.log_audio(wav, ctx.cfg.mel.sample_rate, path)
        if sweep:
            from matplotlib.figure import Figure

            steps = sorted(sweep)
            for st in steps:
                logger.log_metrics({"sweep/fd": sweep[st]["fd"], "sweep/seconds_per_clip": sweep[st]["seconds_per_clip"]},
                                   step=st)
            fig = Figure(figsize=(9, 3.5), layout="constrained")
            ax1, ax2 = fig.subplots(1, 2)
            ax1.plot(steps, [sweep[st]["fd"] for st in steps], "o-")
            ax1.set(xscale="log", xlabel="ODE steps", ylabel=f"FD ({embedder.name})", title="quality against steps")
            ax2.plot(steps, [sweep[st]["seconds_per_clip"] for st in steps], "o-")
            ax2.set(xscale="log", xlabel="ODE steps", ylabel="seconds per clip", title="time against steps")
            logger.log_image(fig, "eval/steps_sweep.png")
