"""The ``rfm`` command (also ``python -m rfm``)."""
from __future__ import annotations

import argparse
import sys
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
    g = p.add_argument_group("refinement")
    g.add_argument("--alpha", type=int, default=d.alpha, help="matrix power α of the transition matrix (default %(default)s)")
    g.add_argument("--n0", type=int, default=d.n0, help="first RFM candidate block, 1-indexed (default %(default)s)")
    g.add_argument("--static-layers", type=int, default=d.static_layers,
                   help="last blocks averaged by the static refinement (default %(default)s)")
    g.add_argument("--box-threshold", type=float, default=d.box_threshold,
                   help="λ of the box mask indicator; CLIP-ES uses 0.4 for VOC, 0.7 for COCO (default %(default)s)")
    g.add_argument("--distance", choices=("abs", "signed"), default=d.distance,
                   help="layer score: 'abs' (paper) or 'signed' (official WeCLIP code) (default %(default)s)")
    g.add_argument("--bg-power", type=float, default=d.bg_power, help="background = (1 − max CAM)^p (default %(default)s)")
    g.add_argument("--par-iterations", type=int, default=d.par_iterations,
                   help="PAR iterations, 0 = off (default %(default)s)")
    g.add_argument("--box", type=_box, action="append", default=[], metavar="CLASS:x0,y0,x1,y1",
                   help="restrict a class to a box (image pixels); repeat for more boxes")


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
    return parser


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
    params = rfm.RefineParams(alpha=args.alpha, n0=args.n0, static_layers=args.static_layers,
                              box_threshold=args.box_threshold, distance=args.distance, boxes=boxes,
                              bg_power=args.bg_power, par_iterations=args.par_iterations)
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
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run}[args.command](args)
    except KeyboardInterrupt:
        print("rfm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        # One clear line for the user's mistakes; real bugs keep their traceback.
        print(f"rfm: error: {err}", file=sys.stderr)
        return 2
