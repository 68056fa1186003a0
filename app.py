"""RFM studio web app: ``python app.py [--clip auto|openai|synthetic|PATH] [--decoder PATH] [--demo] …``
serves http://127.0.0.1:7860."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="RFM studio: see and use CAM refinement in the browser.")
    p.add_argument("--clip", default="auto",
                   help="'auto' (default: checkpoints/ViT-B-16.pt when present, else the built-in CLIP), 'openai' "
                        "(checkpoints/ViT-B-16.pt, downloaded there if missing), 'synthetic' (the built-in small CLIP "
                        "trained on generated scenes, with its decoder) or a path to an OpenAI-format CLIP file")
    p.add_argument("--decoder", default=None,
                   help="WeCLIP decoder checkpoint or 'synthetic'; without one the RFM view stays empty "
                        "(the built-in CLIP brings its own)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--demo", action="store_true",
                   help="small random CLIP and decoder: every view works, heatmaps are meaningless")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--dataset-root", default="datasets",
                   help="with --host other than 127.0.0.1 or --share, 'Add to dataset' writes only inside this "
                        "folder (default ./datasets); on 127.0.0.1 any folder is allowed")
    p.add_argument("--max-side", type=int, default=512,
                   help="long side images are scaled down to for the pipeline; exports keep the original size")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from rfm.session import Models  # after parsing, so --help is instant
    from rfm.ui import Studio, launch

    try:
        models = Models.load(args.clip, args.decoder, args.device, demo=args.demo)
    except (OSError, ValueError) as err:  # a bad --decoder file: say which and why instead of a traceback
        sys.exit(f"error: {err}")
    if models.error:
        print(f"No CLIP weights: {models.error}\nThe app starts anyway and offers demo mode.", file=sys.stderr)
    exposed = args.share or args.host not in ("127.0.0.1", "localhost", "::1")
    root = Path(args.dataset_root).absolute() if exposed else None
    launch(Studio(models, max_side=args.max_side, dataset_root=root), host=args.host, port=args.port,
           share=args.share)


if __name__ == "__main__":
    main()
