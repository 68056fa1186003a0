"""The ``rfm`` command (also ``python -m rfm``)."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

def _box(text: str) -> tuple[str, tuple[float, float, float, float]]:
    """'cat:10,20,200,180' → ('cat', (10, 20, 200, 180))."""
    name, sep, coords = text.rpartition(":")
    try:
        values = tuple(float(v) for v in coords.split(","))
    except ValueError:
        values = ()
    if not sep or not name or len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected CLASS:x0,y0,x1,y1 (image pixels), got {text!r}")
    return name, values


def _add_refine_flags(p: argparse.ArgumentParser) -> None:
    from .predictor import RefineParams

    d = RefineParams()
    g = p.add_argument_group("refinement (defaults: the official settings of the vocabulary; VOC shown)")
    g.add_argument("--alpha", type=int, help=f"matrix power α of the transition matrix (default {d.alpha})")
    g.add_argument("--n0", type=int, help=f"first RFM candidate block, 1-indexed (default {d.n0}; COCO 3)")
    g.add_argument("--static-layers", type=int,
                   help=f"last blocks averaged by the static refinement (default {d.static_layers})")
    g.add_argument("--box-threshold", type=float,
                   help=f"λ of the box mask indicator (default {d.box_threshold}; COCO 0.7)")
    g.add_argument("--distance", choices=("abs", "signed"),
                   help=f"layer score: 'abs' (paper) or 'signed' (official WeCLIP code) (default {d.distance})")
    g.add_argument("--bg-power", type=float, help=f"background = (1 − max CAM)^p (default {d.bg_power})")
    g.add_argument("--par-iterations", type=int, help=f"PAR iterations, 0 = off (default {d.par_iterations})")
    g.add_argument("--box", type=_box, action="append", default=[], metavar="CLASS:x0,y0,x1,y1",
                   help="restrict a class to a box (image pixels); repeat for more boxes")


def _params(args, vocabulary: str, boxes=None):
    from .predictor import official_params

    return official_params(vocabulary, alpha=args.alpha, n0=args.n0, static_layers=args.static_layers,
                           box_threshold=args.box_threshold, distance=args.distance, bg_power=args.bg_power,
                           par_iterations=args.par_iterations, boxes=boxes)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--vocab", default="voc", help="'voc', 'coco' or comma-separated class words (default voc)")
    g.add_argument("--background", default=None, help="comma-separated background words replacing the vocabulary's")
    g.add_argument("--clip", default="openai",
                   help="'openai' (checkpoints/ViT-B-16.pt, downloaded if missing) or a path to an OpenAI-format file")
    g.add_argument("--model", default="ViT-B-16", help="CLIP architecture name for --clip openai (default ViT-B-16)")
    g.add_argument("--decoder", default=None, help="WeCLIP decoder checkpoint (.pth from the official code, or .safetensors)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    g.add_argument("--max-side", type=int, default=512, help="long side the image is scaled down to (default 512)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfm", description="Frozen CLIP CAM refinement (WeCLIP RFM) studio.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="refine the CAMs of one image and write its pseudo label and figures",
                         description="Run CLIP-ES CAM → static refinement → RFM → PAR on one image.")
    run.add_argument("image", help="image file (any format Pillow reads)")
    run.add_argument("--labels", required=True, help="comma-separated classes present in the image (names or indices)")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_model_flags(run)
    _add_refine_flags(run)
    _add_export_parser(sub)
    from .metrics import add_eval_parser

    add_eval_parser(sub)
    return parser


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="pseudo labels, CAMs and COCO masks for a whole dataset (resumable, torchrun)",
                       description="Run the pipeline over a dataset. Rerunning the same command resumes; "
                                   "under torchrun the images are shared among the ranks.")
    src = p.add_argument_group("dataset (one of)")
    src.add_argument("--voc", metavar="ROOT", help="VOC devkit folder (JPEGImages/, Annotations/, SegmentationClass/)")
    src.add_argument("--split", help="split file of stems for --voc (default: every image of JPEGImages/)")
    src.add_argument("--labels-from", default="xml", metavar="mask|xml|npy:FILE",
                     help="image-level labels for --voc: Annotations XML (default), the masks, or a cls_labels .npy")
    src.add_argument("--images", metavar="DIR", help="image folder, with --labels FILE or --coco FILE")
    src.add_argument("--labels", metavar="FILE", help="CSV (image,labels) or JSON labels for --images")
    src.add_argument("--coco", metavar="ANNOTATIONS", help="COCO instances JSON (labels from its annotations)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="png", help="comma-separated subset of png,npy,coco (default png)")
    p.add_argument("--cam-stage", choices=("initial", "static", "rfm"), default=None,
                   help="CAMs written to cams/*.npy (default rfm with a decoder, else static)")
    p.add_argument("--confidence", type=float, default=0.0,
                   help="label 255 where PAR's top share is below this (CLIP-ES uses 0.95 after CRF; default 0: off)")
    p.add_argument("--figures", type=int, default=0, help="side-by-side figures for the first N images")
    p.add_argument("--workers", type=int, default=2, help="image-decoding workers (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace results made with other parameters")
    _add_model_flags(p)
    _add_refine_flags(p)


def cmd_export(args) -> int:
    import rfm
    from .backbone import CHECKPOINT_DIR
    from .batch import ExportOptions, export_dataset, init_distributed, run_identity
    from .data import coco_samples, folder_samples, voc_samples
    from .text import get_vocabulary

    sources = [bool(args.voc), bool(args.images and args.labels), bool(args.coco)]
    if sum(sources) != 1 or (args.coco and not args.images):
        raise ValueError("give exactly one dataset: --voc ROOT | --images DIR --labels FILE | --coco FILE --images DIR")
    if args.box:
        raise ValueError("--box applies to one image (rfm run), not to a dataset")
    vocab_spec = "coco" if args.coco and args.vocab == "voc" else args.vocab
    background = args.background.split(",") if args.background else None
    vocab = get_vocabulary(vocab_spec, background)
    if args.voc:
        samples = voc_samples(args.voc, args.split, args.labels_from, vocab)
    elif args.coco:
        samples = coco_samples(args.coco, args.images)
    else:
        samples = folder_samples(args.images, args.labels, vocab)
    params = _params(args, vocab.name)
    dist = init_distributed(args.device)
    clip = rfm.load_clip(args.model, pretrained=args.clip, device=dist.device)
    clip_file = CHECKPOINT_DIR / f"{args.model}.pt" if str(args.clip) == "openai" else Path(args.clip)
    decoder = rfm.load_decoder(args.decoder) if args.decoder else None
    predictor = rfm.Predictor(clip, vocabulary=vocab, decoder=decoder, device=dist.device, max_side=args.max_side)
    options = ExportOptions(formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
                            cam_stage=args.cam_stage or ("rfm" if decoder is not None else "static"),
                            confidence=args.confidence, figures=args.figures, workers=args.workers,
                            overwrite=args.overwrite)
    identity = run_identity(params, options, clip_file, Path(args.decoder) if args.decoder else None, predictor)
    summary = export_dataset(samples, predictor, params, args.out, options, identity, dist)
    if dist.rank == 0:
        print(f"done {summary['done']}, skipped {summary['skipped']} (already finished), "
              f"failed {len(summary['failed'])} → {Path(args.out) / 'summary.json'}")
    return 0


def _labels(text: str) -> list:
    return [int(t) if t.strip().isdigit() else t.strip() for t in text.split(",") if t.strip()]


def cmd_run(args) -> int:
    import rfm
    from .data import load_image
    from .export import save_cams_npy, save_label_png
    from .viz import save_figure, save_overlays, side_by_side_figure

    image = load_image(args.image)  # before loading models: a bad image fails fast
    boxes: dict[str, list] = {}
    for name, box in args.box:
        boxes.setdefault(name, []).append(box)
    params = _params(args, args.vocab.strip().lower(), boxes)
    out = Path(args.out)
    targets = [out / "label.png", out / "cams.npy", out / "figure.png"]
    if not args.overwrite and any(t.exists() for t in targets):
        raise FileExistsError(f"{out} already holds results; pass --overwrite to replace them")

    clip = rfm.load_clip(args.model, pretrained=args.clip, device=args.device)
    decoder = rfm.load_decoder(args.decoder) if args.decoder else None
    background = args.background.split(",") if args.background else None
    predictor = rfm.Predictor(clip, vocabulary=args.vocab, decoder=decoder, device=args.device,
                              max_side=args.max_side, background=background)
    predictor.set_image(image, labels=_labels(args.labels))
    result = predictor.refine(params)

    written = [save_label_png(result.label, out / "label.png", overwrite=args.overwrite)]
    final = result.cam_rfm if result.cam_rfm is not None else result.cam_static
    written.append(save_cams_npy(out / "cams.npy", result.class_indices, final, overwrite=args.overwrite,
                                 highres=result.cam_initial))
    written += save_overlays(image, result, out, overwrite=args.overwrite)
    written.append(save_figure(side_by_side_figure(image, result), out / "figure.png", overwrite=args.overwrite))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    kept = [i + 1 for i, k in enumerate(result.layer_keep) if k]
    if result.patch.cam_rfm is not None:
        print(f"RFM kept blocks {kept} (distance={params.distance}, N0={params.n0})")
    print(f"wrote {len(written)} files to {out}")
    return 0


def main(argv=None) -> int:
    # open_clip's tokenizer scripts a function at import; the deprecation notice is noise for users
    warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        from .metrics import eval_main

        return {"run": cmd_run, "export": cmd_export, "eval": eval_main}[args.command](args)
    except KeyboardInterrupt:
        print("rfm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        # One clear line for the user's mistakes; real bugs keep their traceback.
        print(f"rfm: error: {err}", file=sys.stderr)
        return 2
