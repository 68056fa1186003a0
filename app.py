"""RFM studio app entry point. The Gradio interface is being built; until it lands this prints how to
use the pipeline from the command line."""
import sys

if __name__ == "__main__":
    print("The RFM studio web app is not built yet. Meanwhile the full pipeline runs from the command line:\n"
          "  .venv/bin/rfm run IMAGE --labels cat,dog --out out/ [--clip checkpoints/ViT-B-16.pt] [--decoder FILE]\n"
          "See README.md.", file=sys.stderr)
    sys.exit(1)
