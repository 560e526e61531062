#!/usr/bin/env python3
"""Independent reference for bitvla_ros: golden outputs per stage for a BitVLA checkpoint.

It runs a checkpoint in the published layout (the one `bitvla make-tiny` writes) with PyTorch and
Hugging Face transformers' own model code: `SiglipVisionModel` and `BitNetModel`, their linear
layers swapped for transformers' `AutoBitLinear` with online W1.58-A8 quantization (the same
function transformers uses for BitNet checkpoints), the tokenizer through `AutoTokenizer` and the
chat template from `tokenizer_config.json`. Only the small OFT parts that transformers does not
ship (projector, proprio projector, the L1 action head, embedding assembly, the shifted row
extraction and un-normalization) are written here, from shared/spec/bitvla-model.md.

Run it with scripts/make_golden.sh (creates the pinned venv, writes the tiny model, runs this).
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # WeightQuant/ActQuant are @torch.compile'd

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoTokenizer, BitNetConfig, BitNetModel, SiglipImageProcessor  # noqa: E402
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402
from transformers.integrations.bitnet import AutoBitLinear, replace_with_bitnet_linear  # noqa: E402
from transformers.utils.quantization_config import BitNetQuantConfig  # noqa: E402

IMAGE_PAD, PROPRIO_PAD, STOP, ACTION_SLOT = 128010, 128011, 128001, 1
NUM_ACTIONS_CHUNK = 8  # prismatic/vla/constants.py, LIBERO


def online_ternary(module: nn.Module) -> nn.Module:
    """Swap every nn.Linear for transformers' AutoBitLinear with online quantization."""
    config = BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="online")
    module = replace_with_bitnet_linear(module, modules_to_not_convert=[], quantization_config=config)
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert layers and all(isinstance(m, AutoBitLinear) and m.online_quant for m in layers)
    return module


def load_weights(module: nn.Module, state: dict, prefix: str, allow_missing=()):
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(own, strict=False, assign=True)
    missing = [m for m in missing if not any(m.startswith(a) for a in allow_missing)]
    if missing or unexpected:
        sys.exit(f"{prefix}: missing {missing}, unexpected {unexpected}")


def load_pt(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


class ActionHead(nn.Module):
    """L1RegressionActionHead's MLPResNet (openvla-oft prismatic/models/action_heads.py)."""

    def __init__(self, input_dim, hidden_dim, action_dim, blocks=2):
        super().__init__()
        self.model = nn.Module()
        self.model.layer_norm1 = nn.LayerNorm(input_dim)
        self.model.fc1 = nn.Linear(input_dim, hidden_dim)
        self.model.mlp_resnet_blocks = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.ffn = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
            self.model.mlp_resnet_blocks.append(block)
        self.model.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.model.fc2 = nn.Linear(hidden_dim, action_dim)

    def forward(self, x):
        m = self.model
        x = torch.relu(m.fc1(m.layer_norm1(x)))
        for block in m.mlp_resnet_blocks:
            x = x + block.ffn(x)
        return m.fc2(m.layer_norm2(x))


def center_crop(img: np.ndarray) -> np.ndarray:
    """tf.image.crop_and_resize (bilinear) of the 90%-area center box, back to uint8 (§5.1)."""
    h, w, _ = img.shape
    x = img.astype(np.float32) * np.float32(1.0 / 255.0)
    s = np.float32(np.sqrt(0.9))
    lo, hi = (np.float32(1) - s) / np.float32(2), (np.float32(1) + s) / np.float32(2)

    def coords(extent, size=224):
        span = np.float32(extent - 1)
        i = np.arange(size, dtype=np.float32)
        v = lo * span + i * ((hi - lo) * span / np.float32(size - 1))
        top = np.floor(v)
        return top.astype(int), np.minimum(np.ceil(v), extent - 1).astype(int), (v - top).astype(np.float32)

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    tl, tr = x[y0][:, x0], x[y0][:, x1]
    bl, br = x[y1][:, x0], x[y1][:, x1]
    fx = fx[None, :, None]
    top = tl + (tr - tl) * fx
    bottom = bl + (br - bl) * fx
    out = top + (bottom - top) * fy[:, None, None]
    # Fancy indexing leaves a non-C-ordered array; safetensors.numpy writes raw memory order.
    return np.ascontiguousarray(np.clip(out * np.float32(255.5), 0, 255).astype(np.uint8))


def make_images(out_dir: Path, seed: int):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224].astype(np.float64)
    a = np.stack([(x * 1.1) % 256, (y * 0.9 + 40) % 256, ((x + y) * 0.5) % 256], -1)
    b = np.stack([128 + 100 * np.sin(x / 17.0), 128 + 100 * np.cos(y / 23.0), (x * y / 200) % 256], -1)
    paths = []
    for name, base in (("third_person.png", a), ("wrist.png", b)):
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(out_dir / name)
        paths.append(out_dir / name)
    return paths


def build_prompt(tokenizer, instruction: str, n_images: int, patches: int, proprio: bool):
    """openvla-oft experiments/robot/bitnet_utils.py get_bitnet_vla_action + llava_to_openai."""
    content = "<image>\n" * n_images + ("<proprio_pad>" if proprio else "")
    content += f"What action should the robot take to {instruction.lower()}?"
    content = re.sub(r"\n?<image>\n?", "<|image_pad|>", content)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    text = text.replace("<|image_pad|>", "<|image_pad|>" * patches)
    return text, tokenizer(text, add_special_tokens=True).input_ids


def run(model_dir: Path, images, instruction, proprio, unnorm_key, dtype, ablate=None):
    cfg = json.loads((model_dir / "config.json").read_text())
    vc, tc = cfg["vision_config"], cfg["text_config"]
    state = {}
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state.update({k: v.float() for k, v in load_file(model_dir / shard).items()})

    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
            num_hidden_layers=vc["num_hidden_layers"], num_attention_heads=vc["num_attention_heads"],
            image_size=vc["image_size"], patch_size=vc["patch_size"], layer_norm_eps=vc["layer_norm_eps"],
            hidden_act=vc["hidden_act"], num_channels=3, vision_use_head=False,
            attn_implementation="eager",
        )
    )
    if vc.get("vit_weight_bits", 32) == 1 and vc.get("vit_act_bits", 32) == 8:
        vision.vision_model.encoder = online_ternary(vision.vision_model.encoder)
    load_weights(vision, state, "vision_tower.", allow_missing=("vision_model.post_layernorm",))
    # BitVLA uses the last encoder layer's output with no post-LayerNorm (§1.1). transformers >=
    # 4.56 returns the post-LN output as the last entry of `hidden_states`, so drop the LN.
    vision.vision_model.post_layernorm = nn.Identity()

    th = tc["hidden_size"]
    projector = nn.Sequential(nn.Linear(vc["hidden_size"], th), nn.GELU(), nn.Linear(th, th))
    load_weights(projector, {k.replace("linear_1", "0").replace("linear_2", "2"): v for k, v in state.items()},
                 "multi_modal_projector.")

    text_cfg = BitNetConfig(
        hidden_size=th, intermediate_size=tc["intermediate_size"], num_hidden_layers=tc["num_hidden_layers"],
        num_attention_heads=tc["num_attention_heads"], num_key_value_heads=tc["num_key_value_heads"],
        rms_norm_eps=tc["rms_norm_eps"], rope_theta=tc["rope_theta"], vocab_size=tc["vocab_size"],
        max_position_embeddings=tc["max_position_embeddings"], hidden_act="relu2",
        attn_implementation="eager",
    )
    llm = online_ternary(BitNetModel(text_cfg))
    load_weights(llm, state, "language_model.model.")

    proprio_state = load_pt(next(model_dir.glob("proprio_projector--*_checkpoint.pt")))
    proprio_projector = nn.Sequential(
        nn.Linear(proprio_state["fc1.weight"].shape[1], th), nn.GELU(), nn.Linear(th, th)
    )
    load_weights(proprio_projector, {k.replace("fc1", "0").replace("fc2", "2"): v for k, v in proprio_state.items()}, "")
    head_state = load_pt(next(model_dir.glob("action_head--*_checkpoint.pt")))
    action_dim = head_state["model.fc2.weight"].shape[0]
    head = ActionHead(head_state["model.fc1.weight"].shape[1], head_state["model.fc1.weight"].shape[0], action_dim)
    load_weights(head, head_state, "")

    for m in (vision, projector, llm, proprio_projector, head):
        m.eval().to(dtype)

    stats = json.loads((model_dir / "dataset_statistics.json").read_text())[unnorm_key]
    processor = SiglipImageProcessor.from_pretrained(model_dir)
    crops = [center_crop(np.asarray(Image.open(p).convert("RGB"))) for p in images]
    pixels = processor(images=[Image.fromarray(c) for c in crops], return_tensors="pt").pixel_values

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    patches = (vc["image_size"] // vc["patch_size"]) ** 2
    prompt_text, ids = build_prompt(tokenizer, instruction, len(images), patches, True)
    p_len = len(ids)
    slots = NUM_ACTIONS_CHUNK * action_dim
    ids = ids + [ACTION_SLOT] * slots + [STOP]

    pq01, pq99 = np.array(stats["proprio"]["q01"]), np.array(stats["proprio"]["q99"])
    proprio_n = np.clip(2 * (np.array(proprio) - pq01) / (pq99 - pq01 + 1e-8) - 1, -1, 1)

    with torch.no_grad():
        out = vision(pixel_values=pixels.to(dtype))
        features = out.last_hidden_state.reshape(-1, vc["hidden_size"])  # last layer, no post-LN
        projected = projector(features)
        ids_t = torch.tensor(ids)
        embeds = llm.embed_tokens(ids_t).clone()
        image_positions = (ids_t == IMAGE_PAD).nonzero().flatten()
        assert len(image_positions) == projected.shape[0]
        embeds[image_positions] = projected
        embeds[(ids_t == PROPRIO_PAD).nonzero().flatten()] = proprio_projector(
            torch.tensor(proprio_n, dtype=dtype)[None]
        )
        if ablate != "keep_action_embeddings":
            embeds[p_len:p_len + slots] = 0
        seq = len(ids)
        mask = torch.zeros(1, 1, seq, seq, dtype=dtype)  # bidirectional: attend to everything
        if ablate == "causal":
            mask = torch.full((1, 1, seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)
        hidden = llm(inputs_embeds=embeds[None], attention_mask=mask).last_hidden_state[0]
        first = p_len if ablate == "unshifted_rows" else p_len - 1
        rows = hidden[first:first + slots]
        normalized = head(rows.reshape(NUM_ACTIONS_CHUNK, -1))

    a = stats["action"]
    q01, q99 = np.array(a["q01"]), np.array(a["q99"])
    mask_a = np.array(a.get("mask", [True] * action_dim))
    norm = normalized.float().numpy().astype(np.float64)
    actions = np.where(mask_a, 0.5 * (norm + 1) * (q99 - q01 + 1e-8) + q01, norm)
    f = lambda t: t.float().numpy().astype(np.float32)  # noqa: E731
    return {
        "input_ids": np.array(ids, dtype=np.int64),
        "prompt_len": np.array([p_len], dtype=np.int64),
        "crops": np.stack(crops),
        "vision": f(features),
        "projector": f(projected),
        "hidden": f(hidden),
        "action_rows": f(rows),
        "normalized": f(normalized),
        "actions": actions.astype(np.float32),
    }, prompt_text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="checkpoint directory (bitvla make-tiny)")
    ap.add_argument("--out", type=Path, required=True, help="golden directory (tests/golden)")
    ap.add_argument("--seed", type=int, default=0, help="make-tiny seed the model was written with")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    images = make_images(args.out, 1234)
    instruction = "Pick up the black bowl between the plate and the ramekin and place it on the plate"
    proprio = [0.05, -0.12, 0.31, 2.9, -0.4, 0.1, 0.021, -0.019]
    unnorm_key = "libero_spatial_no_noops"

    golden, prompt_text = run(args.model, images, instruction, proprio, unnorm_key, torch.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in golden.items()}, args.out / "tiny_f32.safetensors")
    # The reference's own spread: the same pipeline in bf16 (informational, printed only).
    bf16, _ = run(args.model, images, instruction, proprio, unnorm_key, torch.bfloat16)
    scale = np.abs(golden["normalized"]).max()
    bf16_err = float(np.abs(bf16["normalized"] - golden["normalized"]).max() / scale)
    # How far each known mistake moves the actions (the Rust test must see at least this).
    ablations = {}
    for name in ("unshifted_rows", "keep_action_embeddings", "causal"):
        wrong, _ = run(args.model, images, instruction, proprio, unnorm_key, torch.float32, ablate=name)
        ablations[name] = float(np.abs(wrong["normalized"] - golden["normalized"]).max() / scale)
    meta = {
        "model": "bitvla make-tiny", "seed": args.seed,
        "images": [p.name for p in images], "instruction": instruction, "proprio": proprio,
        "unnorm_key": unnorm_key, "horizon": NUM_ACTIONS_CHUNK, "prompt_text_head": prompt_text[:200],
        "prompt_len": int(golden["prompt_len"][0]), "tokens": len(golden["input_ids"]),
        "reference_bf16_vs_f32_max_rel": bf16_err,
        "ablation_max_rel": ablations,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "command": "scripts/make_golden.sh",
    }
    (args.out / "tiny_f32.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
