"""The evaluation tells the truth: every number the evaluate stage logged, recomputed here.

From the generated clips the stage saved (and logged to MLflow) and the held-out real clips of
the audio stage, paired by clip id, each metric is recomputed with the :mod:`lafma.metrics`
function that defines it (not with the stage's own recipe, ``score_generations``), by the
embedder the config names, loaded from the weights file whose SHA-256 the metrics are
labelled with. Each recomputation must match the logged value to rounding; each test also
shows that a miswiring (shuffled pairs, other halves, another embedder) would change it.

Read-only on the shared ``trained`` store. Every test but the last needs it (and is slow).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from mlflow import MlflowClient

from lafma.bundle import load_bundle
from lafma.data.captions import derive_seed
from lafma.metrics import (
    attribute_accuracy,
    build_embedder,
    fit_attribute_classifiers,
    fit_text_audio_projection,
    frechet_distance_from_embeddings,
    inception_score,
    kl_divergence,
)
from pipelines.core import tracking

HELD_OUT = ("test", "validation")
# Recomputed embeddings differ from the stage's by float32 rounding at most (other batch
# sizes); a miswiring moves a metric by far more than FAR (relative).
RTOL = 1e-5
FAR = 1e-3


def close(recomputed: float, logged: float, what: str) -> None:
    assert recomputed == pytest.approx(logged, rel=RTOL, abs=1e-6), f"{what}: recomputed {recomputed}, logged {logged}"


def far(other: float, logged: float, what: str) -> None:
    """``other`` (the metric under a miswiring) differs from ``logged`` by far more than rounding."""
    assert abs(other - logged) > FAR * max(abs(logged), 1e-3), f"{what}: {other} vs {logged} (the test could not fail)"


@dataclass
class Clips:
    """Waveforms (and more) by clip id, in id order."""

    ids: list[str]
    wave: dict[str, np.ndarray]
    caption: dict[str, str]
    rows: dict[str, dict]


@dataclass
class Embedded:
    fd: np.ndarray  # (N, D) rows of the Fréchet distance
    clips: np.ndarray  # (N, D)
    logits: np.ndarray  # (N, K)


@dataclass
class Evidence:
    root: Path
    cfg: object
    out: Path  # the evaluate stage's output
    marker: dict
    record: dict  # its metrics.json
    logged: dict[str, float]  # the MLflow run's metrics
    tags: dict[str, str]
    client: MlflowClient
    run_id: str
    held: Clips
    generated: Clips
    train: Clips
    text: dict[str, np.ndarray]  # caption -> mean-pooled token embedding
    embedder: object
    weights: Path


def audio_clips(audio_dir: str, splits: tuple[str, ...], limit: int) -> Clips:
    rows = []
    for f in sorted(glob.glob(os.path.join(audio_dir, "*.parquet"))):
        t = pq.read_table(f, columns=["id", "caption", "split", "attributes", "waveform", "mel", "n_mels", "frames"])
        rows += [r for r in t.to_pylist() if r["split"] in splits]
    rows = sorted(rows, key=lambda r: r["id"])[:limit]
    return Clips([r["id"] for r in rows], {r["id"]: np.asarray(r["waveform"], np.float32) for r in rows},
                 {r["id"]: r["caption"] for r in rows}, {r["id"]: r for r in rows})


def generated_clips(gen_dir: Path) -> Clips:
    """What the stage generated: its manifest (id -> wav path) and the wavs."""
    rows = {r["id"]: r for r in pq.read_table(gen_dir / "manifest.parquet").to_pylist()}
    wave = {i: sf.read(gen_dir / r["path"], dtype="float32")[0] for i, r in rows.items()}
    return Clips(sorted(rows), wave, {i: r["caption"] for i, r in rows.items()}, rows)


def pooled_text(text_dir: str) -> dict[str, np.ndarray]:
    out = {}
    for f in glob.glob(os.path.join(text_dir, "*.parquet")):
        for r in pq.read_table(f, columns=["caption", "emb", "length"]).to_pylist():
            out[r["caption"]] = np.asarray(r["emb"], np.float32).reshape(r["length"], -1).mean(0)
    return out


@pytest.fixture(scope="module")
def ev(trained) -> Evidence:
    root, cfg, reports = trained
    report = reports["evaluate"]
    out = Path(report.path)
    client = MlflowClient(tracking.tracking_uri(str(root)))
    run = client.get_run(report.info["run_id"])
    assert cfg.evaluate.embedder == "aisfx", "this test knows where aisfx's weights live; extend it for another"
    version = importlib.metadata.version("aisfx")
    weights = Path(root) / "weights" / f"aisfx-{version}.safetensors"  # evaluation_embedder's cache
    return Evidence(
        root=Path(root), cfg=cfg, out=out, marker=report.info,
        record=json.loads((out / "metrics.json").read_text()), logged=run.data.metrics, tags=run.data.tags,
        client=client, run_id=run.info.run_id,
        held=audio_clips(reports["audio"].path, HELD_OUT, cfg.evaluate.max_clips),
        generated=generated_clips(out / "generated"),
        train=audio_clips(reports["audio"].path, ("train",), 1024),
        text=pooled_text(reports["text"].path),
        embedder=build_embedder(cfg.evaluate.embedder, weights).eval(), weights=weights)


def embed(embedder, waves: list[np.ndarray], sample_rate: int) -> Embedded:
    x = torch.from_numpy(np.stack(waves))  # (N, samples)
    with torch.no_grad():
        clips, logits = embedder.embed_and_classify(x, sample_rate)
        fd = embedder.fd_features(x, sample_rate)
    return Embedded(fd.numpy(), clips.numpy(), logits.numpy())


@pytest.fixture(scope="module")
def emb(ev) -> dict[str, Embedded]:
    """The configured embedder's view of the held-out real and the generated clips, both in
    held-out id order (so row i of each is clip ``ev.held.ids[i]``), and of the training clips."""
    sr = ev.cfg.mel.sample_rate
    ids = ev.held.ids
    return {"real": embed(ev.embedder, [ev.held.wave[i] for i in ids], sr),
            "gen": embed(ev.embedder, [ev.generated.wave[i] for i in ids], sr),
            "train": embed(ev.embedder, [ev.train.wave[i] for i in ev.train.ids], sr)}


def logged(ev: Evidence, key: str) -> float:
    """The value in MLflow, which must also be the stage marker's."""
    assert ev.marker["metrics"][key] == pytest.approx(ev.logged[key], rel=1e-12), key
    return ev.logged[key]


@pytest.mark.slow
def test_each_generated_clip_is_paired_with_the_real_clip_and_caption_of_its_id(ev):
    held, gen = ev.held, ev.generated
    assert len(held.ids) >= 4 and ev.marker["rows"] == len(held.ids)
    # The order every paired set was scored in is the held-out clips' id order, recorded.
    assert ev.record["ids"] == held.ids
    assert gen.ids == held.ids
    for i in held.ids:
        assert gen.caption[i] == held.caption[i], i  # generated from its own clip's caption
        assert gen.wave[i].shape == held.wave[i].shape, i
    # Each clip has its own seed, the one the stage planned for its id.
    planned = {r["id"]: r for r in map(json.loads, (ev.out / "generated" / "captions.jsonl").read_text().splitlines())}
    assert {i: gen.rows[i]["seed"] for i in held.ids} == {i: planned[i]["seed"] for i in held.ids}
    assert len({gen.rows[i]["seed"] for i in held.ids}) == len(held.ids)
    # The MLflow table lists the same ids in the same order, each row's audio logged beside it,
    # and that audio is the stage's saved clip of the same id.
    table = json.loads(Path(ev.client.download_artifacts(ev.run_id, "eval/clips.json")).read_text())
    col = {c: k for k, c in enumerate(table["columns"])}
    assert [r[col["id"]] for r in table["data"]] == held.ids
    assert [r[col["caption"]] for r in table["data"]] == [held.caption[i] for i in held.ids]
    for r in table["data"]:
        wav, sr = sf.read(io.BytesIO(Path(ev.client.download_artifacts(ev.run_id, r[col["audio"]])).read_bytes()),
                          dtype="float32")
        assert sr == ev.cfg.mel.sample_rate
        np.testing.assert_array_equal(wav, gen.wave[r[col["id"]]], err_msg=r[col["id"]])


@pytest.mark.slow
def test_fd_kl_and_is_are_what_the_saved_clips_give(ev, emb):
    real, gen = emb["real"], emb["gen"]
    n = len(ev.held.ids)
    close(frechet_distance_from_embeddings(gen.fd, real.fd), logged(ev, "eval/fd"), "eval/fd")
    kl = kl_divergence(real.logits, gen.logits)  # mean over pairs of KL(real_i || generated_i)
    close(kl, logged(ev, "eval/kl"), "eval/kl")
    splits = min(10, n // 2)  # audioldm_eval's 10 splits, at least two clips in each
    close(inception_score(gen.logits, splits=splits)[0], logged(ev, "eval/is"), "eval/is")
    close(inception_score(real.logits, splits=splits)[0], logged(ev, "ref/real/is"), "ref/real/is")
    # Paired by id, not by position in some other list: the pairs shifted by one score another KL.
    far(kl_divergence(real.logits, np.roll(gen.logits, 1, axis=0)), logged(ev, "eval/kl"), "KL of shifted pairs")
    # FD is of generated against the real held-out clips, not against the training clips.
    far(frechet_distance_from_embeddings(gen.fd, emb["train"].fd), logged(ev, "eval/fd"), "FD against training")


@pytest.mark.slow
def test_fd_half_and_real_vs_real_compare_the_halves_they_claim(ev, emb):
    ids = ev.held.ids
    first, second = ev.record["halves"]["first"], ev.record["halves"]["second"]
    # Two disjoint halves covering the held-out set, the sizes as even as they can be.
    assert not set(first) & set(second) and sorted(first + second) == ids and abs(len(first) - len(second)) <= 1
    row = {i: k for k, i in enumerate(ids)}
    a, b = [row[i] for i in first], [row[i] for i in second]
    real, gen = emb["real"].clips, emb["gen"].clips
    close(frechet_distance_from_embeddings(gen[a], real[b]), logged(ev, "eval/fd_half"), "eval/fd_half")
    close(frechet_distance_from_embeddings(real[a], real[b]), logged(ev, "ref/real_vs_real/fd"), "ref/real_vs_real/fd")
    # The halves matter: the other assignment (generated of the second half against real of
    # the first), or the generated half against its own captions' real clips, is another number.
    far(frechet_distance_from_embeddings(gen[b], real[a]), logged(ev, "eval/fd_half"), "fd_half, halves swapped")
    far(frechet_distance_from_embeddings(gen[a], real[a]), logged(ev, "eval/fd_half"), "fd_half, same half")


@pytest.mark.slow
def test_the_text_audio_score_pairs_each_clip_with_its_own_caption(ev, emb):
    train = ev.train
    captions = [train.caption[i] for i in train.ids]
    held_text = torch.from_numpy(np.stack([ev.text[ev.held.caption[i]] for i in ev.held.ids]))
    proj = fit_text_audio_projection(torch.from_numpy(emb["train"].clips),
                                     torch.from_numpy(np.stack([ev.text[c] for c in captions])),
                                     keys=captions, seed=ev.cfg.evaluate.seed)
    per_clip = proj.score(torch.from_numpy(emb["gen"].clips), held_text).numpy()
    close(float(per_clip.mean()), logged(ev, "eval/text_audio"), "eval/text_audio")
    close(float(proj.score(torch.from_numpy(emb["real"].clips), held_text).mean()), logged(ev, "ref/real/text_audio"),
          "ref/real/text_audio")
    # Clip by clip, by id, as the MLflow table lists them.
    table = json.loads(Path(ev.client.download_artifacts(ev.run_id, "eval/clips.json")).read_text())
    col = {c: k for k, c in enumerate(table["columns"])}
    by_id = {r[col["id"]]: r[col["text_audio"]] for r in table["data"]}
    for k, i in enumerate(ev.held.ids):
        close(float(per_clip[k]), by_id[i], f"text_audio of {i}")
    # Each clip against the next clip's caption: another score.
    shifted = proj.score(torch.from_numpy(emb["gen"].clips), held_text.roll(1, dims=0)).numpy()
    far(float(shifted.mean()), logged(ev, "eval/text_audio"), "text_audio with shifted captions")


@pytest.mark.slow
def test_the_attribute_accuracies_are_of_classifiers_fit_on_the_training_clips(ev, emb):
    names = sorted({k.split("/")[1] for k in ev.logged if k.startswith("attr/") and k.endswith("/accuracy")})
    assert names, "the demo corpus has attributes: evaluate should have scored them"

    def labels(clips: Clips, a: str) -> list:
        return [json.loads(clips.rows[i]["attributes"] or "{}").get(a) for i in clips.ids]

    fit = fit_attribute_classifiers(torch.from_numpy(emb["train"].clips), {a: labels(ev.train, a) for a in names})
    held = {a: labels(ev.held, a) for a in names}
    on_gen = attribute_accuracy(fit, torch.from_numpy(emb["gen"].clips), held)
    on_real = attribute_accuracy(fit, torch.from_numpy(emb["real"].clips), held)
    for a in names:
        close(on_gen[a]["accuracy"], logged(ev, f"attr/{a}/accuracy"), f"attr/{a}/accuracy")
        close(on_gen[a]["chance"], logged(ev, f"attr/{a}/chance"), f"attr/{a}/chance")
        close(on_real[a]["accuracy"], logged(ev, f"attr/{a}/real_accuracy"), f"attr/{a}/real_accuracy")


@pytest.mark.slow
def test_the_references_render_the_real_clips_through_the_packaged_back_end(ev, emb, trained):
    _, _, reports = trained
    pipe = load_bundle(reports["package"].info["bundle"])
    rows = [ev.held.rows[i] for i in ev.held.ids]
    mel = torch.from_numpy(np.stack([np.asarray(r["mel"], np.float32).reshape(r["n_mels"], r["frames"]) for r in rows]))
    seeds = [derive_seed(ev.cfg.evaluate.seed, i) for i in ev.held.ids]
    sr = ev.cfg.mel.sample_rate
    with torch.no_grad():
        vocoded = pipe.vocode(mel, seeds)
        roundtrip = pipe.vocode(pipe.vae.decode(pipe.vae.encode(mel).mean), seeds)
    for name, waves in (("vocoder", vocoded), ("vae_vocoder", roundtrip)):
        fd = frechet_distance_from_embeddings(embed(ev.embedder, list(waves.numpy()), sr).fd, emb["real"].fd)
        close(fd, logged(ev, f"ref/{name}/fd"), f"ref/{name}/fd")


@pytest.mark.slow
def test_the_steps_sweep_scores_the_clips_generated_at_each_step_count(ev, emb):
    sweep = ev.marker["sweep"]
    assert sorted(int(s) for s in sweep) == list(ev.cfg.evaluate.sweep_steps)
    history = {m.step: m.value for m in ev.client.get_metric_history(ev.run_id, "sweep/fd")}
    for steps, value in sweep.items():
        clips = generated_clips(ev.out / "sweep" / f"steps-{int(steps):04d}")
        assert clips.ids == ev.held.ids and {clips.rows[i]["steps"] for i in clips.ids} == {int(steps)}
        fd = frechet_distance_from_embeddings(embed(ev.embedder, [clips.wave[i] for i in clips.ids],
                                                    ev.cfg.mel.sample_rate).fd, emb["real"].fd)
        close(fd, value["fd"], f"sweep fd at {steps} steps")
        assert history[int(steps)] == pytest.approx(value["fd"], rel=1e-12)
    assert {ev.generated.rows[i]["steps"] for i in ev.held.ids} == {ev.cfg.sampler.steps}


@pytest.mark.slow
def test_the_metrics_are_labelled_with_the_configured_embedder_and_its_weights(ev, emb):
    digest = hashlib.sha256(ev.weights.read_bytes()).hexdigest()
    name = f"aisfx-{importlib.metadata.version('aisfx')}"
    label = {"embedder": name, "embedder_sha256": digest, "embedder_dim": ev.embedder.dim,
             "embedder_classes": ev.embedder.num_classes}
    assert ev.embedder.name == name and ev.embedder.weights_sha256 == digest
    assert ev.marker["embedder"] == label and ev.record["embedder"] == label
    assert {k: ev.tags[f"lafma.{k}"] for k in label} == {k: str(v) for k, v in label.items()}
    assert ev.marker["gate_metric"] == f"{ev.cfg.evaluate.gate_metric}/{name}"
    assert ev.marker["gate_value"] == logged(ev, f"eval/{ev.cfg.evaluate.gate_metric}")
    # The numbers are this embedder's: the FD recomputed with it matched (above); the same
    # network with its weights perturbed (another file, another hash) measures another FD.
    other = build_embedder(ev.cfg.evaluate.embedder, ev.weights).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05)
    sr = ev.cfg.mel.sample_rate
    fd = frechet_distance_from_embeddings(embed(other, [ev.generated.wave[i] for i in ev.held.ids], sr).fd,
                                          embed(other, [ev.held.wave[i] for i in ev.held.ids], sr).fd)
    far(fd, logged(ev, "eval/fd"), "FD by another embedder")


def test_a_rerun_replaces_the_clip_table_instead_of_appending_to_it(tmp_path):
    """A re-run of evaluate (after a kill) logs into the stage's same MLflow run: MLflow's own
    ``log_table`` would append, and the table would list every clip twice."""
    import pandas as pd

    from pipelines.stages.evaluate import log_table

    run = tracking.start_run(root=str(tmp_path), experiment="evaluate-rerun", run_name="evaluate")
    client = MlflowClient(tracking.tracking_uri(str(tmp_path)))
    for score in (0.1, 0.2):  # the first attempt, then the re-run
        log_table(client, run, pd.DataFrame({"id": ["a", "b", "c"], "text_audio": [score] * 3}), "eval/clips.json")
    table = json.loads(Path(client.download_artifacts(run, "eval/clips.json", str(tmp_path / "dl"))).read_text())
    assert table["columns"] == ["id", "text_audio"] and table["data"] == [["a", 0.2], ["b", 0.2], ["c", 0.2]]
    tag = json.loads(client.get_run(run).data.tags["mlflow.loggedArtifacts"])
    assert tag == [{"path": "eval/clips.json", "type": "table"}]  # still the run's one table
