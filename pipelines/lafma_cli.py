"""The installed ``lafma`` command: ``describe`` (from :mod:`lafma.cli`), ``generate`` and ``import``.

``lafma generate "a dog barks twice" -o dog.wav`` generates one clip with the registered
champion (or any ``--model``: ``models:/lafma/3``, ``runs:/<id>/model``, a bundle directory);
``--candidates 4`` generates four seeds and keeps the clip the text-audio scorer ranks highest.

``lafma import --lfm lafma.ckpt --vae vaegan.ckpt --vocoder hifigan_16k_64bins.ckpt
--text-encoder flan-t5-large/ --out lafma-released/ --register`` turns the published files into
a bundle (and a registered version) that everything else uses unchanged.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Sequence

from lafma import cli as lafma_cli
from lafma.config import MAX_DURATION_SECONDS
from lafma.flow.solvers import METHODS

DEFAULT_MODEL = "models:/lafma@champion"


def _generate(args: argparse.Namespace) -> int:
    from lafma.audio.io import write_audio
    from pipelines.core.registry import load_pipeline

    if not args.caption.strip():
        print("lafma generate: the caption is empty", file=sys.stderr)
        return 2
    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        print(f"lafma generate: {args.output} is a directory; give a .wav file name", file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(args.model, root=args.root)
    except Exception as e:  # unknown alias, missing store, mismatched bundle: say which, no traceback
        print(f"lafma generate: cannot load {args.model} (store: {args.root}): {e}", file=sys.stderr)
        return 1
    extra = {}
    if args.audio is not None:
        from lafma.audio import AudioError
        from lafma.audio.io import load_audio

        try:
            extra["audio"] = load_audio(args.audio, pipe.sample_rate, max_seconds=MAX_DURATION_SECONDS)
        except (AudioError, OSError) as e:
            print(f"lafma generate: cannot read {args.audio}: {e}", file=sys.stderr)
            return 2
        extra["strength"] = args.strength
        if args.regenerate is not None:
            extra["regenerate"] = args.regenerate
    elif args.regenerate is not None or args.strength != 1.0:
        print("lafma generate: --regenerate and --strength need --audio", file=sys.stderr)
        return 2
    scorer = None
    if args.candidates < 1:
        print("lafma generate: --candidates must be >= 1", file=sys.stderr)
        return 2
    if args.candidates > 1 or args.scorer:
        try:
            scorer = _scorer(args, pipe)
        except ValueError as e:  # none recorded and none given, another text encoder, a changed file
            print(f"lafma generate: {e}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    try:
        if scorer is None:
            gen = pipe.generate([args.caption], seeds=None if args.seed is None else [args.seed], steps=args.steps,
                                guidance=args.guidance, solver=args.solver, duration=args.duration, **extra)
            wav, seed, nfe, rate = gen.audio[0], gen.seeds[0], gen.nfe, gen.sample_rate
        else:
            from lafma.metrics.scoring import best_of_n

            seed = secrets.randbelow(2**31) if args.seed is None else args.seed
            if "audio" in extra:
                extra["audio"] = extra["audio"].reshape(1, -1)
            pick = best_of_n(pipe.generate, [args.caption], [seed], args.candidates, scorer=scorer,
                             steps=args.steps, guidance=args.guidance, solver=args.solver, duration=args.duration,
                             **extra)[0]
            wav, seed, nfe, rate = pick.audio, pick.seed, pick.nfe, pipe.sample_rate
            for i, (s, x) in enumerate(zip(pick.seeds, pick.scores)):
                print(f"candidate {i}: seed {s}, score {x:.4f}" + ("  <- kept" if i == pick.index else ""))
    except ValueError as e:  # a region outside the clip, a strength out of range, dopri5 with a region
        print(f"lafma generate: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_audio(out, wav, rate)
    clip = wav.shape[-1] / rate
    print(f"{out}: {clip:.2f} s at {rate} Hz, seed {seed}, {nfe} NFE, "
          f"{seconds:.2f} s ({clip / seconds:.1f}x real time)")
    return 0


def _scorer(args: argparse.Namespace, pipe):
    """The text-audio scorer: ``--scorer``, or the one the model's evaluation recorded."""
    from pipelines.core.registry import bundle_manifest
    from pipelines.scoring import as_written, default_weights_dir, load_scorer, resolve_scorer

    uri = resolve_scorer(args.model, args.scorer, root=args.root)
    text = bundle_manifest(args.model, root=args.root)["config"]["text"]
    return as_written(load_scorer(uri, text_encoder=pipe.text_encoder, text_config=text,
                                  weights_dir=default_weights_dir(args.root), device=str(pipe.device)))


def add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate one clip from a caption")
    g.add_argument("caption", help='e.g. "a dog barks twice"')
    g.add_argument("-o", "--output", required=True, help="output .wav file")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry URI, run URI or bundle directory (default: {DEFAULT_MODEL})")
    g.add_argument("--root", default=os.environ.get("LAFMA_ROOT", ".lafma"),
                   help="storage root whose MLflow store holds the registry (default: .lafma, or $LAFMA_ROOT; "
                        "$MLFLOW_TRACKING_URI wins when set)")
    g.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
    g.add_argument("--solver", default=None, choices=METHODS)
    g.add_argument("--duration", type=float, default=None, help="seconds (default: the model's)")
    g.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed)")
    g.add_argument("--audio", default=None, help="start from this clip (any rate or channels; the duration "
                                                 "defaults to its length): with --strength or --regenerate")
    g.add_argument("--strength", type=float, default=1.0,
                   help="audio-to-audio: how much of the path to regenerate, 0 (the clip's round trip) to 1 "
                        "(plain generation with the same seed; default)")
    g.add_argument("--candidates", type=int, default=1, metavar="N",
                   help="best-of-N: generate seeds SEED, SEED+1, ... SEED+N-1 and keep the clip the text-audio "
                        "scorer ranks highest (default 1: plain generation)")
    g.add_argument("--scorer", default=None, metavar="DIR",
                   help="scorer folder for --candidates (default: the one the model's evaluation recorded)")
    g.add_argument("--regenerate", type=_time_range, default=None, metavar="START:END",
                   help="inpainting: the seconds to generate, the rest kept from --audio; past the clip's end "
                        "with a longer --duration, continuation")
    g.set_defaults(func=_generate)


def _time_range(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return float(start), float(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, e.g. 1.0:2.5; got {text!r}") from None


def _import(args: argparse.Namespace) -> int:
    from lafma.config import ConfigError, load_yaml, model_sections
    from lafma.convert.checkpoint import CheckpointError
    from lafma.importer import import_published

    try:
        base = model_sections(load_yaml(args.config)) if args.config else None
        manifest = import_published(lfm=args.lfm, vae=args.vae, vocoder=args.vocoder,
                                    vocoder_config=args.vocoder_config, text_encoder=args.text_encoder,
                                    out_dir=args.out, base=base, overrides=args.overrides)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"lafma import: {e}", file=sys.stderr)
        return 2
    sources = manifest["lineage"]["sources"]
    print(f"{args.out}: bundle of " + ", ".join(f"{c} from {s['name']} ({s['format']})" for c, s in sources.items()
                                                 if c != "vocoder_config"))
    if args.register:
        from pipelines.core.registry import register_imported

        reg = register_imported(args.out, root=args.root, sources=sources)
        print(f"registered {reg.uri} (candidate; not gated: evaluate it, then promote with pipelines/promote.py)")
    return 0


def add_import(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("import", help="published LAFMA / AudioLDM weights -> a bundle (and a registered version)")
    i.add_argument("--lfm", required=True, help="released LAFMA LFM checkpoint ({'model': ...}, keys unet.*)")
    i.add_argument("--vae", required=True,
                   help="released VAEGAN checkpoint ({'autoencoder': ...}), an LDM checkpoint, or a diffusers vae/ dir")
    i.add_argument("--vocoder", required=True,
                   help="AudioLDM's hifigan_16k_64bins.ckpt, or a diffusers vocoder/ dir (SpeechT5HifiGan)")
    i.add_argument("--vocoder-config", default=None, help="the HiFi-GAN JSON (default: beside the .ckpt)")
    i.add_argument("--text-encoder", required=True, help="FLAN-T5 save_pretrained directory or hub id")
    i.add_argument("--out", required=True, help="bundle directory to write")
    i.add_argument("--config", default=None, help="YAML whose sections the bundle starts from")
    i.add_argument("--register", action="store_true", help="also register the bundle as a version of lafma")
    i.add_argument("--root", default=os.environ.get("LAFMA_ROOT", ".lafma"),
                   help="storage root whose MLflow store holds the registry (default: .lafma, or $LAFMA_ROOT)")
    i.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. unet.num_heads=8 sampler.steps=200")
    i.set_defaults(func=_import)


def add_commands(sub: argparse._SubParsersAction) -> None:
    add_generate(sub)
    add_import(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.config import PipelineConfig

    return lafma_cli.main(argv, extend=add_commands, config_cls=PipelineConfig)


if __name__ == "__main__":
    sys.exit(main())
