"""Model and LoRA ids -> where their files are, what format they are, and their sha256.

Hashes identify images across runs (they enter the plan ids and the MLflow tags). Hashing a
multi-GB checkpoint is slow, so each file's hash is cached by (path, size, mtime) in a small JSON
file; a changed file gets a new hash and so new image ids. No torch, no weights loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runner.assets import RECIPE_VERSION
from runner.request import Problem

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
HASHED_SUFFIXES = WEIGHT_SUFFIXES + (".json", ".txt", ".model")


@dataclass(frozen=True)
class Resolved:
    """A model or LoRA source found on disk."""

    id: str
    kind: str  # diffusers_folder | single_file | hub_cache | lora_file
    path: Path  # folder or file on disk
    weight_name: str | None = None
    sha256: str = ""  # of the file (or folder tree); "" for a builtin asset not built yet
    builtin: bool = False

    @property
    def identity(self) -> str:
        """What enters the image ids: the file hash, or the recipe version of a builtin asset.

        Builtin assets are built deterministically by the project, so their recipe identifies
        them before they exist (`lora-sweep plan` works on a fresh clone without torch).
        """
        return f"builtin:{RECIPE_VERSION}:{self.id}" if self.builtin else self.sha256

    @property
    def short_hash(self) -> str:
        """A1111's AutoV2 short hash (first 10 hex digits of the sha256), to match files across tools."""
        return self.sha256[:10]


class HashCache:
    """sha256 of files, remembered by (path, size, mtime) in one JSON file; thread-safe."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path and path.exists():
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries = {}

    def file_sha256(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        with self._lock:
            entry = self._entries.get(key)
            if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
                return entry["sha256"]
        digest = hashlib.sha256()
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        sha = digest.hexdigest()
        with self._lock:
            self._entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
            self._dirty = True
        return sha

    def tree_sha256(self, folder: Path) -> str:
        """A folder's identity: the sha256 of its weight and config files' names and hashes."""
        digest = hashlib.sha256()
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in HASHED_SUFFIXES):
            digest.update(f"{file.relative_to(folder).as_posix()}:{self.file_sha256(file)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if not (self.path and self._dirty):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes-")
        with os.fdopen(fd, "w") as fh:
            json.dump(self._entries, fh)
        os.replace(tmp, self.path)
        self._dirty = False


LORA_KEY_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", ".alpha", "lora_linear_layer")
LYCORIS_MARKERS = {"hada_w1": "LoHa", "lokr_w1": "LoKr", "oft_blocks": "OFT", ".glora_": "GLoRA"}


def safetensors_keys(file: Path) -> list[str]:
    """The tensor names in a .safetensors file, read from its JSON header (no torch, no weights)."""
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
    return [k for k in header if k != "__metadata__"]


def check_lora_file(lora_id: str, path: Path) -> Problem | None:
    """A clear refusal for files that are not LoRAs (or not safetensors at all) before any weight is loaded."""
    where = f"loras.{lora_id}.source"
    if path.suffix != ".safetensors":
        return None  # .bin/.pt LoRAs are checked when loaded
    try:
        keys = safetensors_keys(path)
    except (OSError, ValueError) as exc:
        return Problem(where, f"{path.name} is not a readable .safetensors file ({exc})", "re-download or re-export the LoRA")
    for marker, kind in LYCORIS_MARKERS.items():
        if any(marker in k for k in keys):
            return Problem(
                where, f"{path.name} is a LyCORIS {kind}, which this engine does not load", "use a plain LoRA (LoCon/LoRA) export"
            )
    if not any(m in k for k in keys for m in LORA_KEY_MARKERS):
        return Problem(where, f"{path.name} has no LoRA weights (tensors like {keys[0] if keys else 'none'})", "point it at a LoRA file")
    return None


SDXL_LORA_MARKERS = ("lora_te2_", "text_encoder_2.", "te2.")


def lora_family(path: Path) -> str:
    """'sdxl' when a LoRA has weights for SDXL's second text encoder, else 'sd' (from the header only)."""
    if path.suffix != ".safetensors":
        return "sd"
    try:
        keys = safetensors_keys(path)
    except (OSError, ValueError):
        return "sd"
    return "sdxl" if any(m in k for k in keys for m in SDXL_LORA_MARKERS) else "sd"


def model_family(resolved: Resolved) -> str:
    """'sdxl' for SDXL pipelines, else 'sd', read from model_index.json (single files: 'sd')."""
    try:
        index = json.loads((resolved.path / "model_index.json").read_text())
    except (OSError, ValueError):
        return "sd"
    return "sdxl" if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index else "sd"


def check_model_folder(model_id: str, folder: Path) -> Problem | None:
    """Every component model_index.json names must be a folder beside it."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        return Problem(f"models.{model_id}.source", f"{folder}/model_index.json cannot be read ({exc})", "re-save the pipeline")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if not (folder / name).is_dir():
            return Problem(
                f"models.{model_id}.source",
                f"{folder} has no '{name}' folder, which model_index.json lists",
                "copy the whole pipeline folder",
            )
    return None


def _hub_cache_path(repo_id: str) -> Path | None:
    """The local snapshot of a hub repo, or None. Never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or hub library missing
        return None


def resolve_model(model_id: str, source: str, hashes: HashCache) -> tuple[Resolved | None, Problem | None]:
    where = f"models.{model_id}.source"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            return None, Problem(where, f"{source} is a folder without model_index.json", "point it at a diffusers pipeline folder")
        problem = check_model_folder(model_id, path)
        if problem:
            return None, problem
        return Resolved(model_id, "diffusers_folder", path, sha256=hashes.tree_sha256(path)), None
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            return None, Problem(
                where, f"{source} is not a .safetensors or .ckpt checkpoint", "give a checkpoint file or a diffusers folder"
            )
        return Resolved(model_id, "single_file", path, sha256=hashes.file_sha256(path)), None
    if HUB_ID.match(source) and not source.endswith(WEIGHT_SUFFIXES):
        cached = _hub_cache_path(source)
        if cached is None:
            return None, Problem(
                where,
                f"hub model '{source}' is not in the local Hugging Face cache (nothing is downloaded at run time)",
                f"pre-download it with: huggingface-cli download {source}",
            )
        return Resolved(model_id, "hub_cache", cached, sha256=hashes.tree_sha256(cached)), None
    return None, Problem(where, f"path {source} does not exist", "fix the path, or use a hub id already in the local cache")


def resolve_lora(lora_id: str, source: str, weight_name: str | None, hashes: HashCache) -> tuple[Resolved | None, Problem | None]:
    where = f"loras.{lora_id}.source"
    path = Path(source).expanduser()
    if path.is_dir() or (not path.exists() and HUB_ID.match(source) and not source.endswith(WEIGHT_SUFFIXES)):
        folder = path if path.is_dir() else _hub_cache_path(source)
        if folder is None:
            return None, Problem(
                where, f"hub LoRA '{source}' is not in the local cache", f"pre-download it with: huggingface-cli download {source}"
            )
        if weight_name is None:
            candidates = sorted(folder.glob("*.safetensors"))
            if len(candidates) != 1:
                return None, Problem(
                    f"loras.{lora_id}.weight_name",
                    f"{folder} holds {len(candidates)} .safetensors files",
                    "set weight_name to the file to load",
                )
            weight_name = candidates[0].name
        path = folder / weight_name
    if not path.is_file():
        return None, Problem(where, f"LoRA file {path} does not exist", "fix the path in the loras registry")
    problem = check_lora_file(lora_id, path)
    if problem:
        return None, problem
    return Resolved(lora_id, "lora_file", path, weight_name=path.name, sha256=hashes.file_sha256(path)), None


@dataclass
class Registry:
    models: dict[str, Resolved]
    loras: dict[str, Resolved]
    problems: list[Problem]


ENTRY_KEYS = {"models": ("source", "variant", "builtin", "lcm"), "loras": ("source", "weight_name", "builtin", "lcm")}


def check_entry(registry: str, name: str, entry: Any) -> Problem | None:
    """A registry entry is a mapping with a `source` and known keys only."""
    from runner.request import did_you_mean

    if not isinstance(entry, Mapping) or not isinstance(entry.get("source"), str) or not entry.get("source"):
        return Problem(f"{registry}.{name}", "needs a source (a path or hub id)", f"e.g. +{registry}.{name}={{source: /path/to/file}}")
    for key in entry:
        if key not in ENTRY_KEYS[registry]:
            return Problem(
                f"{registry}.{name}.{key}",
                "unknown key",
                did_you_mean(key, ENTRY_KEYS[registry]) or f"known: {', '.join(ENTRY_KEYS[registry])}",
            )
    return None


def resolve_all(
    models: Mapping[str, Any],
    loras: Mapping[str, Any],
    model_ids: set[str],
    lora_ids: set[str],
    hashes: HashCache,
) -> Registry:
    """Resolve and hash the models and LoRAs a plan uses; unknown ids become problems."""
    registry = Registry({}, {}, [])
    kinds = [
        ("models", "model_id", models, model_ids, registry.models, "diffusers_folder", lambda i, s: resolve_model(i, s["source"], hashes)),
        (
            "loras",
            "lora_model",
            loras,
            lora_ids,
            registry.loras,
            "lora_file",
            lambda i, s: resolve_lora(i, s["source"], s.get("weight_name"), hashes),
        ),
    ]
    for name, field, known, wanted, found, builtin_kind, resolve in kinds:
        for item in sorted(wanted):
            if item not in known:
                registry.problems.append(_unknown(field, item, known, name))
                continue
            spec = known[item]
            if problem := check_entry(name, item, spec):
                registry.problems.append(problem)
                continue
            if spec.get("builtin") and not Path(spec["source"]).exists():  # built on first use; its recipe is its identity
                found[item] = Resolved(item, builtin_kind, Path(spec["source"]), builtin=True)
                continue
            resolved, problem = resolve(item, spec)
            if problem:
                registry.problems.append(problem)
            else:
                found[item] = replace(resolved, builtin=bool(spec.get("builtin")))
    hashes.save()
    return registry


def _unknown(field: str, name: str, known: Mapping[str, Any], registry: str) -> Problem:
    from runner.request import closest

    guess = closest(name, known)
    fix = f"did you mean '{guess}'?" if guess else f"add it under `{registry}:` in the config"
    return Problem(
        field, f"unknown {'LoRA' if registry == 'loras' else 'model'} id '{name}'", f"{fix} (known: {', '.join(known) or 'none'})"
    )
