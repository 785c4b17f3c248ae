"""LoRA training runs as registry entries: a folder or glob of checkpoints, each its own LoRA id, and their triggers.

A kohya or ai-toolkit run leaves `mine-000004.safetensors`, `mine_000001500.safetensors`, ... whose safetensors
metadata say the epoch and step (kohya's `ss_epoch` / `ss_steps`; else the number in the file name). An entry
`loras.mine: {source: /train/out/mine*.safetensors}` stands for all of them: `mine@e4` (an epoch), `mine@s1500`
(a step) or `mine@4` (a number in the name), in training order, each with its own hash. Reads headers only.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last number in a file name: kohya's -000004, ai-toolkit's _000001500
# files loaded as weight deltas (engines/deltas.py): LyCORIS factors, and kohya-layout DoRA (`dora_scale`, which
# diffusers would hand to peft with another magnitude convention than the web UIs')
LYCORIS_FACTORS = ((".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"), (".dora_scale", "DoRA"))
TRIGGER_KEYS = ("modelspec.trigger_phrase", "trigger_word", "ss_trigger_word")


@dataclass(frozen=True)
class Checkpoint:
    id: str  # mine@e4, mine@s1500, mine@4
    path: Path
    epoch: int | None
    step: int | None
    trigger: str | None


def raw_header(file: Path) -> dict[str, Any]:
    """A .safetensors file's JSON header, `__metadata__` included; ValueError when it is not one."""
    with open(file, "rb") as fh:
        size_bytes = fh.read(8)
        if len(size_bytes) != 8:
            raise ValueError("file is too short")
        size = int.from_bytes(size_bytes, "little")
        if size <= 0 or size > 100_000_000 or size > file.stat().st_size - 8:
            raise ValueError("header size is invalid")
        header = json.loads(fh.read(size))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's `__metadata__` (strings), from its header only; {} when it has none."""
    try:
        metadata = raw_header(path).get("__metadata__")
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def lycoris_kind(keys: list[str]) -> str | None:
    """'LoHa', 'LoKr' or 'DoRA' (kohya's layout) for the files engines/deltas.py loads as weight deltas, else None."""
    return next((kind for marker, kind in LYCORIS_FACTORS if any(marker in k for k in keys)), None)


def is_checkpoint_source(source: str) -> bool:
    """A glob, or a folder holding several .safetensors (a single-file folder stays a plain LoRA entry)."""
    if any(c in source for c in "*?["):
        return True
    path = Path(source).expanduser()
    return path.is_dir() and len(list(path.glob("*.safetensors"))) > 1


def _json(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    """A metadata value that a trainer stored as a JSON object (safetensors metadata are strings); {} otherwise."""
    try:
        value = json.loads(metadata.get(key) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def is_ai_toolkit(metadata: Mapping[str, str]) -> bool:
    return _json(metadata, "software").get("name") == "ai-toolkit"


def trigger_of(metadata: Mapping[str, str]) -> str | None:
    """The trigger phrase a trainer wrote into the file (modelspec, ai-toolkit), if any.

    ai-toolkit writes its `trigger_word` only as a one-folder, one-tag `ss_tag_frequency` ({"1_<trigger>": {"<trigger>": 1}}),
    for A1111's sake: that is read as its trigger; kohya's real caption counts stay suggestions (tag_suggestions).
    """
    written = next((metadata[k].strip() for k in TRIGGER_KEYS if metadata.get(k, "").strip()), None)
    if written or not is_ai_toolkit(metadata):
        return written
    folders = _json(metadata, "ss_tag_frequency")
    tags = [tag for counts in folders.values() if isinstance(counts, dict) for tag in counts]
    return (tags[0].strip() or None) if len(folders) == 1 and len(tags) == 1 else None


def training_position(metadata: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(epoch, step) a checkpoint was saved at: kohya's ss_epoch / ss_steps, ai-toolkit's training_info."""
    info = _json(metadata, "training_info")
    epoch = _int(metadata.get("ss_epoch")) if metadata.get("ss_epoch") else _int(info.get("epoch"))
    step = _int(metadata.get("ss_steps")) if metadata.get("ss_steps") else _int(info.get("step"))
    return epoch, step


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def checkpoints(name: str, source: str) -> list[Checkpoint]:
    """The checkpoints of a training run, in training order (step, then epoch, then the number in the name)."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else sorted(Path(p) for p in glob.glob(str(path)))
    found = []
    for file in files:
        metadata = safetensors_metadata(file)
        epoch, step = training_position(metadata)
        number = NUMBER.search(file.stem)
        found.append((file, epoch, step, _int(number.group(1)) if number else None, trigger_of(metadata), is_ai_toolkit(metadata)))
    # the id says what orders the run: epochs where each file has its own (kohya saving per epoch), else steps
    # (ai-toolkit, or kohya saving every n steps), else the number in the name
    epochs, steps = [f[1] for f in found], [f[2] for f in found]
    by_step = all(f[5] for f in found) and _distinct(steps)  # ai-toolkit counts and saves by step
    kind = "s" if by_step else "e" if _distinct(epochs) else "s" if _distinct(steps) else ""
    out = []
    for file, epoch, step, number, trigger, _ in found:
        value = {"e": epoch, "s": step}.get(kind, number)
        label = f"{kind}{value}" if value is not None else file.stem
        out.append(Checkpoint(f"{name}@{label}", file, epoch, step if step is not None else (number if kind == "" else None), trigger))
    return sorted(out, key=lambda c: (c.step if c.step is not None else -1, c.epoch if c.epoch is not None else -1, c.id))


def _distinct(values: list[int | None]) -> bool:
    return None not in values and len(set(values)) == len(values)


def thin(ids: list[str], last: int | None = None, every: int | None = None) -> list[str]:
    """`every: 2` keeps every second checkpoint counting back from the last one; `last: 3` the last three."""
    kept = ids[::-1][:: max(1, every or 1)][::-1]
    return kept[-last:] if last else kept


# the network a LoRA file holds, from its key names (the first marker found)
NETWORK_MARKERS = (("oft_blocks", "OFT"), ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), (".diff", "full"))
TOOLS = (("ss_network_module", "kohya"), ("ss_output_name", "kohya"), ("modelspec.architecture", "modelspec"))


def lora_info(path: Path, keys: list[str]) -> dict[str, str]:
    """What a LoRA file says about itself (metadata and key names): tool, base model, network, rank/alpha, training."""
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    info: dict[str, str] = {}
    # ai-toolkit writes kohya's ss_output_name / ss_base_model_version too: its own `software` tag goes first
    tool = "ai-toolkit" if is_ai_toolkit(metadata) else next((name for key, name in TOOLS if key in metadata), None)
    if tool == "kohya" and "lycoris" in metadata.get("ss_network_module", ""):
        tool = "LyCORIS (kohya)"
    peft_keys = any(".lora_A." in k or ".lora_B." in k for k in keys)
    info["tool"] = tool or ("diffusers/peft" if peft_keys else "LyCORIS" if lycoris_kind(keys) else "unknown")
    base = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or metadata.get("ss_sd_model_name")
    if base:
        info["base"] = base
    network = lycoris_kind(keys) or next((name for marker, name in NETWORK_MARKERS if any(marker in k for k in keys)), None)
    if network is None:
        conv = "conv" in metadata.get("ss_network_args", "") or any("_conv" in k and "lora_down" in k for k in keys)
        network = "LoCon" if conv else "LoRA"
    info["network"] = network
    for key, name in (("ss_network_dim", "rank"), ("ss_network_alpha", "alpha")):
        if metadata.get(key):
            info[name] = metadata[key]
    if "rank" not in info and (rank := _rank_from_keys(path, keys)):
        info["rank"] = str(rank)
    epoch, step = training_position(metadata)
    info |= {name: str(value) for name, value in (("epoch", epoch), ("step", step)) if value is not None}
    if metadata.get("ss_resolution"):
        info["resolution"] = metadata["ss_resolution"].strip("()").replace(", ", "x")
    if trigger := trigger_of(metadata):
        info["trigger"] = trigger
    return info


def _rank_from_keys(path: Path, keys: list[str]) -> int | None:
    """A LoRA's rank from the shape of its first down/A matrix (files without kohya's ss_network_dim)."""
    first = next((k for k in keys if k.endswith((".lora_down.weight", ".lora_A.weight"))), None)
    if first is None or path.suffix != ".safetensors":
        return None
    try:
        shape = raw_header(path).get(first, {}).get("shape") or []
    except (OSError, ValueError):
        return None
    return int(shape[0]) if shape else None


def info_line(lora_id: str, info: Mapping[str, str]) -> str:
    """'mine@e4: kohya, sd_v1, LoRA rank 4 alpha 1, epoch 4, step 1000, 512x512, trigger "sks style"'."""
    parts = [info.get("tool", "unknown")]
    parts += [info["base"]] if "base" in info else []
    network = info.get("network", "LoRA") + "".join(f" {k} {info[k]}" for k in ("rank", "alpha") if k in info)
    parts.append(network)
    parts += [f"{k} {info[k]}" for k in ("epoch", "step") if k in info]
    parts += [info["resolution"]] if "resolution" in info else []
    parts += [f'trigger "{info["trigger"]}"'] if "trigger" in info else []
    return f"{lora_id}: " + ", ".join(parts)


def tag_suggestions(path: Path, count: int = 5) -> list[str]:
    """kohya's `ss_tag_frequency` (caption tags per dataset folder): the most frequent tags, to suggest as triggers."""
    raw = safetensors_metadata(path).get("ss_tag_frequency")
    try:
        folders = json.loads(raw) if raw else {}
    except ValueError:
        return []
    totals: dict[str, int] = {}
    for tags in folders.values() if isinstance(folders, dict) else []:
        for tag, n in (tags or {}).items():
            totals[tag.strip()] = totals.get(tag.strip(), 0) + int(n)
    return [t for t, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:count]]


# LoRA key prefixes by the pipeline part they patch (kohya's lora_unet_/lora_te*_, diffusers' unet./transformer./text_encoder*.)
KEY_PARTS = (
    ("lora_unet_", "denoiser"),
    ("lora_transformer_", "denoiser"),
    ("lycoris_", "denoiser"),  # LyCORIS' own names over the diffusers model
    ("unet.", "denoiser"),
    ("transformer.", "denoiser"),
    ("diffusion_model.", "denoiser"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
)
# where a key's module name ends: the LoRA, DoRA and LyCORIS factor names
FACTOR_MARKS = re.compile(
    r"\.(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_mid|alpha|dora_scale|lora_magnitude_vector|hada_|lokr_|diff\b|diff_b\b)"
)
PART_NAMES = {
    "denoiser": "UNet/transformer",
    "text_encoder": "text encoder",
    "text_encoder_2": "text encoder 2",
    "text_encoder_3": "text encoder 3",
}


def lora_module(key: str) -> str | None:
    """The layer a LoRA key patches (`lora_unet_down_blocks_0_..._to_q`, `unet.down_blocks.0....to_q`); None for other keys."""
    found = FACTOR_MARKS.search(key)
    return key[: found.start()] if found else None


def lora_parts(keys: list[str]) -> dict[str, set[str]]:
    """A LoRA file's modules by the pipeline part they patch ('denoiser', 'text_encoder', ...; 'model' when unprefixed)."""
    parts: dict[str, set[str]] = {}
    for key in keys:
        module = lora_module(key)
        if module is None:
            continue
        part = next((name for prefix, name in KEY_PARTS if module.startswith(prefix)), "model")
        parts.setdefault(part, set()).add(module)
    order = [name for _, name in KEY_PARTS]
    return dict(sorted(parts.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
