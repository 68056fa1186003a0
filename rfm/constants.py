"""Constants shared across the pipeline, its exports and its metrics (plain values, no imports)."""

IGNORE_INDEX = 255  # label value of pixels no class is claimed for (VOC's outline band, padding, low confidence)

# CLIP's image normalisation (OpenAI's preprocessing; CLIP-ES and WeCLIP use it unchanged)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CAM_STAGES = ("initial", "static", "rfm")  # the three CAMs a Result holds, in pipeline order
STAGES = CAM_STAGES + ("label",)  # ... and the PAR pseudo label made from the last one

DISTANCES = ("abs", "signed")  # RFM layer score: the paper's Σ|A_f − A^l| or the official code's signed sum

# Largest matrix power α: the walk T₁^α has mixed to its stationary blur long before (the app offers
# 1..4), and from α ≈ 54 000 float32 underflows and the CAMs become NaN.
MAX_ALPHA = 64

# Rows per strip when an image-size map is streamed to a file: 256 rows of a 10000-pixel-wide
# float32 map of one class are 10 MB, so a huge image never needs a whole map in memory.
STRIP_ROWS = 256
