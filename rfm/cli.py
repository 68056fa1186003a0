"""The ``rfm`` command (also ``python -m rfm``)."""
from __future__ import annotations

import argparse
import math
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
    from .params import RefineParams

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
    from .params import official_params

    return official_params(vocabulary, alpha=args.alpha, n0=args.n0, static_layers=args.static_layers,
                           box_threshold=args.box_threshold, distance=args.distance, bg_power=args.bg_power,
                           par_iterations=args.par_iterations, boxes=boxes)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--vocab", default=None,
                   help="'voc', 'coco', 'synthetic' or comma-separated class words "
                        "(default voc; synthetic with --clip synthetic; coco with --coco)")
    g.add_argument("--background", default=None, help="comma-separated background words replacing the vocabulary's")
    g.add_argument("--clip", default="openai",
                   help="'openai' (checkpoints/ViT-B-16.pt, downloaded if missing), 'synthetic' (the built-in "
                        "small CLIP of generated scenes, with its decoder) or a path to an OpenAI-format file")
    g.add_argument("--model", default="ViT-B-16", help="CLIP architecture name for --clip openai (default ViT-B-16)")
    g.add_argument("--decoder", default=None,
                   help="WeCLIP decoder checkpoint (.pth from the official code, or .safetensors), or 'synthetic' "
                        "(default with --clip synthetic, except for rfm train, which starts a fresh decoder)")
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
    _add_train_parser(sub)
    _add_synth_parser(sub)
    _add_eval_parser(sub)
    _add_sweep_parser(sub)
    return parser


def _add_dataset_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("dataset (one of)")
    src.add_argument("--voc", metavar="ROOT", help="VOC devkit folder (JPEGImages/, Annotations/, SegmentationClass/)")
    src.add_argument("--split", help="split file of stems for --voc (default: every image of JPEGImages/)")
    src.add_argument("--labels-from", default="xml", metavar="mask|xml|npy:FILE",
                     help="image-level labels for --voc: Annotations XML (default), the masks, or a cls_labels .npy")
    src.add_argument("--images", metavar="DIR", help="image folder, with --labels FILE or --coco FILE")
    src.add_argument("--labels", metavar="FILE", help="CSV (image,labels) or JSON labels for --images")
    src.add_argument("--coco", metavar="ANNOTATIONS", help="COCO instances JSON (labels from its annotations)")


def _dataset(args):
    """(vocabulary, samples) from the dataset flags."""
    from .data import coco_samples, folder_samples, voc_samples
    from .text import get_vocabulary

    sources = [bool(args.voc), bool(args.images and args.labels), bool(args.coco)]
    if sum(sources) != 1 or (args.coco and not args.images):
        raise ValueError("give exactly one dataset: --voc ROOT | --images DIR --labels FILE | --coco FILE --images DIR")
    vocab = get_vocabulary(args.vocab, args.background.split(",") if args.background else None)
    if args.voc:
        return vocab, voc_samples(args.voc, args.split, args.labels_from, vocab)
    if args.coco:
        return vocab, coco_samples(args.coco, args.images)
    return vocab, folder_samples(args.images, args.labels, vocab)


def _clip_file(args) -> Path:
    from .paths import CHECKPOINT_DIR, SYNTHETIC_CLIP

    named = {"openai": CHECKPOINT_DIR / f"{args.model}.pt", "synthetic": SYNTHETIC_CLIP}
    return named.get(str(args.clip), Path(args.clip))


def _check_flags_for(clip, params, image_size: tuple[int, int] | None = None, crop: int | None = None) -> None:
    """The flags that depend on the CLIP, checked as soon as it is loaded: before the decoder, the
    dataset's images or any output, and naming the flag."""
    for flag, value in (("--n0", params.n0), ("--static-layers", params.static_layers)):
        if value > clip.num_blocks:
            raise ValueError(f"{flag} {value}: this CLIP has {clip.num_blocks} blocks (1..{clip.num_blocks})")
    p = clip.patch_size
    if image_size is not None and min(image_size) < p:
        raise ValueError(f"the image is {image_size[1]}×{image_size[0]} pixels; each side must be at least one "
                         f"{p}-pixel patch")
    if crop is not None and (crop < p or crop % p):
        raise ValueError(f"--crop {crop}: must be a multiple of the CLIP's {p}-pixel patch (the official crop is 320)")


def _decoder_file(args) -> Path | None:
    from .decoder import decoder_file

    return decoder_file(args.decoder) if args.decoder else None


def _resolve_model_defaults(args) -> None:
    """Defaults that depend on other flags: the vocabulary and decoder of --clip synthetic, COCO's vocabulary."""
    if args.vocab is None:
        args.vocab = "synthetic" if args.clip == "synthetic" else "coco" if getattr(args, "coco", None) else "voc"
    if args.decoder is None and args.clip == "synthetic" and args.command != "train":
        args.decoder = "synthetic"


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="pseudo labels, CAMs and COCO masks for a whole dataset (resumable, torchrun)",
                       description="Run the pipeline over a dataset. Rerunning the same command resumes; "
                                   "under torchrun the images are shared among the ranks.")
    _add_dataset_flags(p)
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
    from .batch import ExportOptions, export_dataset, init_distributed, run_identity

    if args.box:
        raise ValueError("--box applies to one image (rfm run), not to a dataset")
    vocab, samples = _dataset(args)
    params = _params(args, vocab.name)
    options = ExportOptions(formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
                            cam_stage=args.cam_stage or ("rfm" if args.decoder else "static"),
                            confidence=args.confidence, figures=args.figures, workers=args.workers,
                            overwrite=args.overwrite)
    dist = init_distributed(args.device)
    clip = rfm.load_clip(args.model, pretrained=args.clip, device=dist.device)
    _check_flags_for(clip, params)
    clip_file = _clip_file(args)
    decoder = rfm.load_decoder(args.decoder) if args.decoder else None
    predictor = rfm.Predictor(clip, vocabulary=vocab, decoder=decoder, device=dist.device, max_side=args.max_side)
    identity = run_identity(params, options, clip_file, _decoder_file(args), predictor)
    summary = export_dataset(samples, predictor, params, args.out, options, identity, dist)
    if dist.rank != 0:
        return 0
    print(f"done {summary['done']}, skipped {summary['skipped']} (already finished), "
          f"failed {len(summary['failed'])} → {Path(args.out) / 'summary.json'}")
    if summary["failed"] and not summary["done"] and not summary["skipped"]:
        print(f"rfm: error: no image could be exported (the first failure: {summary['failed'][0]['stem']}: "
              f"{summary['failed'][0]['reason']})", file=sys.stderr)
        return 1
    return 0


def _add_train_parser(sub) -> None:
    from .params import TrainConfig

    d = TrainConfig(steps=1)
    p = sub.add_parser("train", help="train the WeCLIP decoder on a dataset with the frozen CLIP",
                       description="Train the WeCLIP decoder (REFERENCE §4). Writes OUT/decoder.safetensors + .json "
                                   "(load with --decoder), log.csv, losses.png and state.pt (--resume).")
    _add_dataset_flags(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, required=True, help="training steps (the official VOC run: 30000)")
    p.add_argument("--cache-features", action="store_true",
                   help="run CLIP once per image and train on cached float16 features (fast on a CPU; no rescaling)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--eval-every", type=int, default=0,
                   help="every K steps, mIoU of the pseudo labels on --val-split (needs ground-truth masks)")
    p.add_argument("--val-split", help="split file of validation stems (same --voc root; default: up to "
                                       "--val-images training images that have masks)")
    p.add_argument("--val-images", type=int, default=20, help="validation images when no --val-split (default 20)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--crop", type=int, default=d.crop, help=f"crop size in pixels (default {d.crop})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"decoder learning rate (default {d.lr})")
    p.add_argument("--switch-step", type=int, default=None,
                   help="RFM replaces the static refinement after this step (default: half of --steps)")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"checkpoint period (default {d.save_every})")
    p.add_argument("--cache-side", type=int, default=d.cache_side,
                   help=f"long side of the cached scale (default {d.cache_side})")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help=f"decoder width (default {d.embed_dim})")
    p.add_argument("--seed", type=int, default=0)
    _add_model_flags(p)
    _add_refine_flags(p)


def cmd_train(args) -> int:
    import rfm
    from .fileio import file_sha256
    from .data import voc_samples
    from .params import TrainConfig
    from .train import train

    vocab, samples = _dataset(args)
    if args.val_split and not args.voc:
        raise ValueError("--val-split needs --voc")
    val = voc_samples(args.voc, args.val_split, args.labels_from, vocab) if args.val_split else \
        [s for s in samples if s.gt is not None][:args.val_images]
    if args.eval_every and not val:
        raise ValueError("--eval-every needs validation images with ground-truth masks (--voc with SegmentationClass/)")
    params = _params(args, vocab.name)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                         switch_step=args.switch_step, save_every=args.save_every, eval_every=args.eval_every,
                         seed=args.seed, cache_features=args.cache_features, cache_side=args.cache_side,
                         embed_dim=args.embed_dim)
    clip = rfm.load_clip(args.model, pretrained=args.clip, device=args.device)
    _check_flags_for(clip, params, crop=config.crop)
    decoder = rfm.load_decoder(args.decoder) if args.decoder and not args.resume else None
    train(samples, clip, vocab, params, config, args.out, decoder=decoder, resume=args.resume, val_samples=val,
          clip_id=file_sha256(_clip_file(args)))
    print(f"decoder written to {Path(args.out) / 'decoder.safetensors'} (use --decoder with rfm run/export or the app)")
    return 0


def _add_synth_parser(sub) -> None:
    p = sub.add_parser("synth", help="generate scenes with known ground truth (the built-in model's world)",
                       description="Write generated scenes as a VOC-layout folder: JPEGImages/, SegmentationClass/ "
                                   "(palette PNGs, class index + 1, 255 outline band), Annotations/*.xml and "
                                   "ImageSets/Segmentation/SPLIT.txt. Use with --vocab synthetic (or --clip synthetic).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, required=True, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0); the built-in CLIP was trained on "
                                                       "seed 1 and its decoder on seed 3, benchmarked on seed 2")
    p.add_argument("--start", type=int, default=0, help="first scene index (default 0)")
    p.add_argument("--split", default="all", help="name of the split file written (default all)")
    p.add_argument("--overwrite", action="store_true", help="rewrite scenes whose files exist")


def cmd_synth(args) -> int:
    from .synthetic import write_dataset

    stems = write_dataset(args.out, args.num, seed=args.seed, split=args.split, start=args.start,
                          overwrite=args.overwrite)
    print(f"{len(stems)} scenes in {args.out} (split {Path(args.out) / 'ImageSets/Segmentation' / (args.split + '.txt')})")
    return 0


def _labels(text: str) -> list:
    return [int(t) if t.strip().isdigit() else t.strip() for t in text.split(",") if t.strip()]


def cmd_run(args) -> int:
    import rfm
    from .data import read_image
    from .export import save_cams_npy, save_label_png
    from .viz import overlay_paths, save_figure, save_overlays, side_by_side_figure

    file = read_image(args.image, args.max_side)  # before loading models: a bad image fails fast
    boxes: dict[str, list] = {}
    for name, box in args.box:
        boxes.setdefault(name, []).append(box)
    params = _params(args, args.vocab.strip().lower(), boxes)
    out = Path(args.out)
    _refuse_existing([out / "label.png", out / "cams.npy", out / "figure.png"], args.overwrite)

    clip = rfm.load_clip(args.model, pretrained=args.clip, device=args.device)
    _check_flags_for(clip, params, image_size=file.size)
    decoder = rfm.load_decoder(args.decoder) if args.decoder else None
    background = args.background.split(",") if args.background else None
    predictor = rfm.Predictor(clip, vocabulary=args.vocab, decoder=decoder, device=args.device,
                              max_side=args.max_side, background=background)
    predictor.set_image(file.rgb, labels=_labels(args.labels), image_size=file.size)
    result = predictor.refine(params)
    # The views are drawn at the work resolution (the image itself unless larger than --max-side);
    # the label and the CAMs are written at full size, strip by strip.
    work = predictor.features.work_image
    preview = result.resized(work.shape[:2])
    _refuse_existing(overlay_paths(preview, out), args.overwrite)

    written = [save_label_png(result.label_rows(), out / "label.png", overwrite=args.overwrite)]
    written.append(save_cams_npy(out / "cams.npy", result.class_indices, result.cam_rows(result.final_stage),
                                 overwrite=args.overwrite, highres=result.cam_rows("initial")))
    written += save_overlays(work, preview, out, overwrite=args.overwrite)
    written.append(save_figure(side_by_side_figure(work, preview), out / "figure.png", overwrite=args.overwrite))
    for note in (*file.notes, *result.notes):
        print(f"note: {note}", file=sys.stderr)
    kept = [i + 1 for i, k in enumerate(result.layer_keep) if k]
    if result.patch.cam_rfm is not None:
        print(f"RFM kept blocks {kept} (distance={params.distance}, N0={params.n0})")
    print(f"wrote {len(written)} files to {out}")
    return 0


def _refuse_existing(paths, overwrite: bool) -> None:
    """Before anything is written: files of an earlier run in --out are kept unless --overwrite."""
    existing = sorted(str(p) for p in paths if p.exists())
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}"
                              f"; pass --overwrite to replace them, or choose another --out")


REPORT_JSON = "eval.json"
CONFUSION_PNG = "confusion.png"


def parse_bg_powers(text: str) -> tuple[float | int, ...]:
    """'1,2' → (1, 2); '1:10' → 1..10 inclusive; 'a:b:step' → a, a+step, … ≤ b; comma-separated parts mix."""
    powers: list = []
    for part in (t.strip() for t in str(text).split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                bits = [float(b) for b in part.split(":")]
                if len(bits) not in (2, 3):
                    raise ValueError
                start, stop = bits[0], bits[1]
                step = bits[2] if len(bits) == 3 else 1.0
                if step <= 0 or stop < start:
                    raise ValueError
                count = int(math.floor((stop - start) / step + 1e-9)) + 1
                powers += [round(start + i * step, 10) for i in range(count)]
            else:
                powers.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected powers like '1,2', '1:10' or '0.1:0.5:0.1', got {text!r}") from None
    if not powers or any(not (math.isfinite(p) and p > 0) for p in powers):
        raise argparse.ArgumentTypeError(f"bg powers must be positive numbers, got {text!r}")
    from .metrics import power_key

    return tuple(power_key(p) for p in powers)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="score predicted labels (.png) or CAMs (.npy) against ground-truth masks",
        description="mIoU / precision / recall of <pred>/<stem>.png label maps or <stem>.npy CAM files "
                    "(CLIP-ES format; background (1 - max CAM)^p, best p searched) against <gt>/<stem>.png "
                    "(class indices, 255 = ignore). Predicted 255 on a labelled pixel counts as a miss.")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of <stem>.png labels or <stem>.npy CAMs")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth <stem>.png masks")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes including background (default: from --class-names, 21 for voc)")
    p.add_argument("--class-names", default="voc",
                   help="'voc', 'coco', 'synthetic' or comma-separated foreground names; background is prepended "
                        "(default voc)")
    p.add_argument("--bg-power", type=parse_bg_powers, default=(1, 2), metavar="P",
                   help="background powers to search for CAMs: '1,2' (CLIP-ES attention CAMs, default), "
                        "'1:10' (range), values < 1 = constant background score")
    p.add_argument("--cam-key", default="attn_highres",
                   help="CAM entry of the .npy files: attn_highres (refined, default) or highres (initial)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help=f"report file (default <pred>_{REPORT_JSON}, beside the folder)")
    p.add_argument("--confusion-png", default=None, metavar="FILE",
                   help=f"confusion matrix figure (default <pred>_{CONFUSION_PNG}, beside the folder)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_eval(args) -> int:
    from .metrics import evaluate_folder, format_table, resolve_class_names, save_report_json
    from .viz import save_confusion_png

    pred = Path(args.pred)
    names = resolve_class_names(args.class_names, args.num_classes)
    # Beside the folder, not in it: a training script globbing <pred>/*.png must not meet the figure.
    json_path = Path(args.json) if args.json else pred.with_name(f"{pred.name}_{REPORT_JSON}")
    png_path = Path(args.confusion_png) if args.confusion_png else pred.with_name(f"{pred.name}_{CONFUSION_PNG}")
    exclude = [json_path, png_path]  # in case the user points them into the prediction folder
    report = evaluate_folder(pred, args.gt, num_classes=len(names), class_names=names, bg_powers=args.bg_power,
                             progress=not args.no_progress, cam_key=args.cam_key, exclude=exclude)
    print(format_table(report))
    if report.missing:
        print(f"warning: {len(report.missing)} ground-truth mask(s) in {args.gt} have no prediction "
              f"in {pred}; they were not evaluated (listed in the JSON)", file=sys.stderr)
    save_report_json(report, json_path)
    save_confusion_png(report, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0



def _add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="score every setting of a parameter grid over a dataset, per stage",
                       description="One CLIP pass per image, then every setting (the Cartesian product of the value "
                                   "lists, or --grid FILE) scored per stage (initial, static, rfm, label) against the "
                                   "ground truth, exactly as rfm export + rfm eval would score it. Rerunning resumes.")
    _add_dataset_flags(p)
    p.add_argument("--gt", metavar="DIR", help="ground-truth <stem>.png masks (default: --voc's SegmentationClass/)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("the grid (comma-separated values, a:b for integer ranges; unswept: rfm export's defaults)")
    for name, example in (("alpha", "1,2,3"), ("n0", "5:9"), ("box-threshold", "0.3,0.4,0.5"),
                          ("static-layers", "6,8"), ("distance", "abs,signed"), ("bg-power", "1,2"),
                          ("par-iterations", "0,20")):
        g.add_argument(f"--{name}", metavar="VALUES", help=f"e.g. {example}")
    g.add_argument("--grid", metavar="FILE", help='JSON list of settings instead: [{"alpha": 2, "n0": 7}, …]')
    p.add_argument("--overwrite", action="store_true", help="discard a sweep of other settings in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_model_flags(p)


def cmd_sweep(args) -> int:
    import rfm
    from . import sweep
    from .batch import init_distributed
    from .fileio import file_sha256
    from .params import official_params

    vocab, samples = _dataset(args)
    if args.gt:
        from dataclasses import replace

        samples = [replace(s, gt=Path(args.gt) / f"{s.stem}.png") for s in samples]
    defaults = official_params(vocab.name)
    if args.grid:
        settings = sweep.read_grid(args.grid, defaults)
    else:
        values = {name: sweep.parse_values(name, getattr(args, name)) for name in sweep.SWEPT
                  if getattr(args, name) is not None}
        settings = sweep.settings_grid(values, defaults)
    dist = init_distributed(args.device)
    clip = rfm.load_clip(args.model, pretrained=args.clip, device=dist.device)
    for setting in settings:
        _check_flags_for(clip, rfm.RefineParams(**setting))
    decoder = rfm.load_decoder(args.decoder) if args.decoder else None
    predictor = rfm.Predictor(clip, vocabulary=vocab, decoder=decoder, device=dist.device, max_side=args.max_side)
    num_classes = len(vocab) + 1
    models = {"clip": file_sha256(_clip_file(args)), "decoder": file_sha256(_decoder_file(args)) if args.decoder else None,
              "max_side": args.max_side, "vocab": vocab.class_names}
    identity = sweep.sweep_identity(settings, samples, models, num_classes)
    out = Path(args.out)
    totals = sweep.run_sweep(samples, predictor, settings, out, num_classes, identity, dist, args.overwrite,
                             progress=not args.no_progress)
    if dist.rank != 0:
        return 0
    names = ("background", *vocab.class_names)
    rows = sweep.sweep_rows(settings, totals, names)
    best = sweep.best_rows(rows)
    dataset = _dataset_argv(args)
    model_args = [f"--clip {args.clip}", *([f"--decoder {args.decoder}"] if args.decoder else []),
                  f"--max-side {args.max_side}", f"--vocab {args.vocab}"]
    commands = {stage: sweep.export_command(row, stage, dataset, model_args) for stage, row in best.items()}
    sweep.save_results(out, rows, best, commands)
    for stage in best:
        print(sweep.format_table(rows, stage), end="\n\n")
    for stage, row in best.items():
        print(f"best {stage}: mIoU {100 * row['miou']:.2f}% with " +
              ", ".join(f"{k}={row[k]}" for k in sweep.SWEPT))
    print(f"reproduce the best pseudo labels: {commands.get('label', '')}")
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'} and the heatmaps")
    return 0


def _dataset_argv(args) -> list[str]:
    """The dataset flags of this command, as they would be typed again."""
    flags = [("--voc", args.voc), ("--split", args.split), ("--images", args.images), ("--labels", args.labels),
             ("--coco", args.coco)]
    argv = [f"{flag} {value}" for flag, value in flags if value]
    if args.voc:
        argv.append(f"--labels-from {args.labels_from}")
    return argv


def main(argv=None) -> int:
    # open_clip's tokenizer scripts a function at import; the deprecation notice is noise for users
    warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    if hasattr(args, "clip"):
        _resolve_model_defaults(args)
    try:
        return {"run": cmd_run, "export": cmd_export, "train": cmd_train, "synth": cmd_synth,
                "eval": cmd_eval, "sweep": cmd_sweep}[args.command](args)
    except KeyboardInterrupt:
        print("rfm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        # One clear line for the user's mistakes; real bugs keep their traceback.
        print(f"rfm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's refusals: read-only folder, full disk, permissions
        where = f"{err.filename}: " if err.filename else ""
        print(f"rfm: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
