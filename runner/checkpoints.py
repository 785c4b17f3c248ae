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
LYCORIS_FACTORS = ((".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"))
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
    """'LoHa' or 'LoKr' when a file holds those LyCORIS factors (engines/deltas.py loads them), else None."""
    return next((kind for marker, kind in LYCORIS_FACTORS if any(marker in k for k in keys)), None)


def is_checkpoint_source(source: str) -> bool:
    """A glob, or a folder holding several .safetensors (a single-file folder stays a plain LoRA entry)."""
    if any(c in source for c in "*?["):
        return True
    path = Path(source).expanduser()
    return path.is_dir() and len(list(path.glob("*.safetensors"))) > 1


def trigger_of(metadata: Mapping[str, str]) -> str | None:
    """The trigger phrase a trainer wrote into the file (modelspec, ai-toolkit), if any."""
    return next((metadata[k].strip() for k in TRIGGER_KEYS if metadata.get(k, "").strip()), None)


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
        epoch, step = _int(metadata.get("ss_epoch")), _int(metadata.get("ss_steps"))
        number = NUMBER.search(file.stem)
        found.append((file, epoch, step, _int(number.group(1)) if number else None, trigger_of(metadata)))
    # the id says what orders the run: epochs where every file has one, else steps, else the number in the name
    kind = "e" if all(f[1] is not None for f in found) else "s" if all(f[2] is not None for f in found) else ""
    out = []
    for file, epoch, step, number, trigger in found:
        value = {"e": epoch, "s": step}.get(kind, number)
        label = f"{kind}{value}" if value is not None else file.stem
        out.append(Checkpoint(f"{name}@{label}", file, epoch, step if step is not None else (number if kind == "" else None), trigger))
    return sorted(out, key=lambda c: (c.step if c.step is not None else -1, c.epoch if c.epoch is not None else -1, c.id))


def thin(ids: list[str], last: int | None = None, every: int | None = None) -> list[str]:
    """`every: 2` keeps every second checkpoint counting back from the last one; `last: 3` the last three."""
    kept = ids[::-1][:: max(1, every or 1)][::-1]
    return kept[-last:] if last else kept


# the network a LoRA file holds, from its key names (the first marker found)
NETWORK_MARKERS = (("oft_blocks", "OFT"), ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), (".diff", "full"))
TOOLS = (("ss_network_module", "kohya"), ("ss_output_name", "kohya"), ("software", "ai-toolkit"), ("modelspec.architecture", "modelspec"))


def lora_info(path: Path, keys: list[str]) -> dict[str, str]:
    """What a LoRA file says about itself (metadata and key names): tool, base model, network, rank/alpha, training."""
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    info: dict[str, str] = {}
    tool = next((name for key, name in TOOLS if key in metadata), None)
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
    for key, name in (("ss_network_dim", "rank"), ("ss_network_alpha", "alpha"), ("ss_epoch", "epoch"), ("ss_steps", "step")):
        if metadata.get(key):
            info[name] = metadata[key]
    if metadata.get("ss_resolution"):
        info["resolution"] = metadata["ss_resolution"].strip("()").replace(", ", "x")
    if trigger := trigger_of(metadata):
        info["trigger"] = trigger
    return info


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
