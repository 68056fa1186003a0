"""Train the built-in CLIP on generated scenes: OpenAI layout, 12 blocks, patch 16, contrastive.

    .venv/bin/python scripts/train_synthetic_clip.py --out runs/synthetic-clip        # ≈ 45 min on 2 CPU cores
    .venv/bin/python scripts/train_synthetic_clip.py --out runs/synthetic-clip --resume

Deterministic: scenes come from ``rfm.synthetic`` (seed ``--seed``, indices 0..pool−1), every
random draw of step t from a generator seeded by (seed, t), and the torch thread count is fixed,
so a rerun (or a resumed run) on the same machine retraces the same steps. Writes ``clip.pt``
(an OpenAI-format fp16 state dict, read by ``rfm.load_clip`` like OpenAI's file), ``log.csv`` and
``state.pt`` (every ``--save-every`` steps, for ``--resume``).

The image tower is trained on the feature CLIP-ES's CAM uses (the mean of the patch tokens after
``ln_post`` and the projection) and, with half the weight, on the CLS feature open_clip's
``encode_image`` returns. The loss is CLIP's symmetric InfoNCE with every caption in the batch
that is true of an image counted as its positive (in this small world a batch holds many true
captions: "a photo of a ball." is true of every image with a ball); the 20 prompts CLIP-ES asks
with ("a clean origami ball.", ..., "a clean origami sky.") join every batch's captions.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rfm.constants import CLIP_MEAN as OPENAI_MEAN, CLIP_STD as OPENAI_STD  # noqa: E402
from rfm.demo import SYNTHETIC_ARCH  # noqa: E402
from rfm.synthetic import (BACKGROUNDS, PALETTE, Scene, SceneObject, caption, generate_scene,  # noqa: E402
                           prompt_captions)

COLOURS = tuple(PALETTE)

ARCH = SYNTHETIC_ARCH  # OpenAI layout: one head per 64 channels
TRAIN_SIDE = ARCH["image_size"]  # 192: 12 × 12 patches; the stored positional embedding is this grid


def build_model(seed: int):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return CLIP(ARCH["embed_dim"],
                vision_cfg=CLIPVisionCfg(layers=ARCH["layers"], width=ARCH["width"], patch_size=ARCH["patch_size"],
                                         image_size=TRAIN_SIDE),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=ARCH["text_width"],
                                     heads=ARCH["text_width"] // 64, layers=ARCH["text_layers"]),
                quick_gelu=True)


def image_features(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, S, S) normalised → (patch-mean feature, CLS feature), each (B, E), unnormalised."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.transformer(v.ln_pre(x))
    x = v.ln_post(x)
    return x[:, 1:].mean(1) @ v.proj, x[:, 0] @ v.proj


def supcon(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −(1/|P_i|) Σ_{j∈P_i} log softmax(logits_i)_j: InfoNCE with several positives."""
    logp = logits.log_softmax(dim=1)
    return -((logp * positive).sum(1) / positive.sum(1).clamp(min=1)).mean()


class ScenePool:
    """``size`` square scenes generated once at the training side, with their labels and backgrounds."""

    def __init__(self, seed: int, size: int, side: int, cache: Path):
        self.seed = seed
        if cache.is_file():
            data = np.load(cache, allow_pickle=False)
            self.images, self.objects, self.backgrounds = data["images"], data["objects"], data["backgrounds"]
            if len(self.images) == size:
                return
        from tqdm import tqdm

        images = np.zeros((size, side, side, 3), np.uint8)
        objects = np.full((size, 3, 2), -1, np.int64)  # (class, colour) of up to 3 objects
        backgrounds = np.zeros(size, np.int64)
        for i in tqdm(range(size), desc="generating scenes", unit="img"):
            scene = generate_scene(seed, i, size=(side, side))
            images[i] = scene.image
            for k, o in enumerate(scene.objects):
                objects[i, k] = (o.cls, COLOURS.index(o.colour))
            backgrounds[i] = BACKGROUNDS.index(scene.background)
        self.images, self.objects, self.backgrounds = images, objects, backgrounds
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, images=images, objects=objects, backgrounds=backgrounds)
        tmp.replace(cache)

    def scene_stub(self, i: int) -> Scene:
        """What a caption needs of scene i, without its pixels."""
        objs = [SceneObject(int(c), COLOURS[int(k)], (0, 0, 0, 0), 1) for c, k in self.objects[i] if c >= 0]
        return Scene(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8),
                     BACKGROUNDS[int(self.backgrounds[i])], objs)


def batch_for_step(pool: ScenePool, step: int, batch: int, seed: int):
    """(images uint8 (B, S, S, 3), captions, scene stubs) of step ``step``: a function of (seed, step)."""
    rng = np.random.default_rng([seed, 7, step])
    idx = rng.choice(len(pool.images), size=batch, replace=False)
    images = pool.images[idx].copy()
    flip = rng.random(batch) < 0.5
    images[flip] = images[flip, :, ::-1]
    scenes = [pool.scene_stub(int(i)) for i in idx]
    captions = [caption(s, rng) for s in scenes]
    return images, captions, scenes


def to_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_state(path: Path, model, optimizer, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    tmp.replace(path)


def export_weights(model, path: Path) -> None:
    """The OpenAI-format state dict in fp16 (``rfm.load_clip`` casts to fp32)."""
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(path)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, seed: int, num: int) -> float:
    """Fraction of held-out scenes whose top-k classes (k = number present) are exactly the present ones,
    scored with the patch-mean feature against "a clean origami {class}."."""
    from rfm.synthetic import CLASSES

    text = F.normalize(model.encode_text(tokenizer([f"a clean origami {c}." for c in CLASSES])), dim=-1)
    hits = 0
    for i in range(num):
        scene = generate_scene(seed, i, size=(TRAIN_SIDE, TRAIN_SIDE))
        feat = F.normalize(image_features(model, to_input(scene.image[None]))[0], dim=-1)
        top = set((feat @ text.T)[0].topk(len(scene.labels)).indices.tolist())
        hits += top == set(scene.labels)
    return hits / num


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1, help="scene seed of the training pool (default 1)")
    p.add_argument("--pool", type=int, default=20000, help="scenes in the training pool (default 20000)")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="torch threads; fixed so reruns retrace the same steps")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-seed", type=int, default=2, help="scene seed for the held-out zero-shot check")
    args = p.parse_args(argv)

    import open_clip

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    pool = ScenePool(args.seed, args.pool, TRAIN_SIDE, args.out / f"pool-{args.seed}-{args.pool}.npz")

    model = build_model(args.seed)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "embedding" not in n]
    rest = [p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    start = 0
    state_path = args.out / "state.pt"
    if args.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        print(f"resuming at step {start}")
    prompts = prompt_captions()
    prompt_tokens = tokenizer([c.text for c in prompts])
    log_path = args.out / "log.csv"
    if start == 0:
        log_path.write_text("step,loss,logit_scale,lr,seconds\n")
    model.train()
    t0 = time.time()
    for step in range(start, args.steps):
        images, captions, scenes = batch_for_step(pool, step, args.batch, args.seed)
        texts = captions + prompts
        tokens = torch.cat([tokenizer([c.text for c in captions]), prompt_tokens])
        positive = torch.tensor([[c.true_of(s.labels, s.background) for c in texts] for s in scenes],
                                dtype=torch.float32)  # (B, B + 20)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        torch.manual_seed(args.seed * 100003 + step)
        avg, cls = image_features(model, to_input(images))
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = 0.0
        for feat, weight in ((avg, 1.0), (cls, 0.5)):
            logits = scale * F.normalize(feat, dim=-1) @ txt.T
            # image → text over all texts; text → image for the batch's own captions
            loss = loss + weight * 0.5 * (supcon(logits, positive) + supcon(logits[:, :args.batch].T,
                                                                              positive[:, :args.batch].T))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        with log_path.open("a") as f:
            f.write(f"{step + 1},{loss.item():.5f},{scale.item():.3f},{optimizer.param_groups[0]['lr']:.6g},"
                    f"{time.time() - t0:.1f}\n")
        if (step + 1) % 10 == 0:
            rate = (step + 1 - start) / (time.time() - t0)
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} scale {scale.item():.1f} "
                  f"{rate:.2f} steps/s, {(args.steps - step - 1) / rate / 60:.1f} min left", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_state(state_path, model, optimizer, step + 1)
            export_weights(model, args.out / "clip.pt")
    model.eval()
    acc = zero_shot_accuracy(model, tokenizer, args.eval_seed, 200)
    print(f"zero-shot multi-label exact-set accuracy on 200 held-out scenes (seed {args.eval_seed}): {acc:.3f}")


if __name__ == "__main__":
    main()
