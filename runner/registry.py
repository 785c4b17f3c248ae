"""Model, LoRA, VAE, embeddings and upscaler ids -> where their files are, what format they are, and their sha256.

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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from runner.checkpoints import lora_info, raw_header
from runner.config import EmbeddingSource, LoraSource, ModelSource, VaeSource
from runner.errors import Problem, closest, did_you_mean
from runner.families import CHECKPOINTS, FAMILIES, VARIANTS, family_of_pipeline, label, lora_families
from runner.families import checkpoint_family as family_of_checkpoint_keys
from runner.world.assets import RECIPE_VERSION

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
HASHED_SUFFIXES = WEIGHT_SUFFIXES + (".json", ".txt", ".model")


@dataclass(frozen=True)
class Resolved:
    """A model, LoRA, VAE, embedding or upscaler found on disk."""

    id: str
    kind: str  # diffusers_folder | single_file | transformer_file | hub_cache | lora_file | vae_file | embedding_file
    path: Path  # folder or file on disk
    weight_name: str | None = None
    sha256: str = ""  # of the file (or folder tree); "" for a builtin asset not built yet
    builtin: bool = False
    config: Path | None = None  # single-file checkpoints: the diffusers folder their configs come from
    variant: str | None = None  # diffusers folders: the weight variant to load ("fp16")
    family: str = "sd"  # a name of runner/families.py (models: from model_index.json or the checkpoint's tensor names)
    token: str | None = None  # textual inversion embeddings: the prompt token they define
    quantization: str = ""  # models: how the weights are stored when not plain floats ("gguf:Q8_0")

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


LORA_KEY_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", ".alpha", "lora_linear_layer", "hada_w1", "lokr_w1")
LYCORIS_MARKERS = {"oft_blocks": "OFT", ".glora_": "GLoRA"}  # LyCORIS types no engine here loads (LoHa/LoKr do: engines/deltas.py)


def safetensors_header(file: Path) -> dict[str, Any]:
    """Tensor name -> {dtype, shape, ...} of a .safetensors file, read from its JSON header (no torch, no weights)."""
    header = dict(raw_header(file))
    header.pop("__metadata__", None)
    return header


def safetensors_keys(file: Path) -> list[str]:
    return list(safetensors_header(file))


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


CROSS_ATTENTION_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def lora_fit(path: Path) -> tuple[str, ...] | None:
    """The families a LoRA file is for, from its key names (runner/families.py: LORA_MARKERS); None: its keys do not say."""
    if path.suffix != ".safetensors":
        return None
    try:
        return lora_families(safetensors_keys(path))
    except (OSError, ValueError):
        return None


def lora_cross_attention_width(path: Path) -> int | None:
    """The text width a LoRA's cross-attention key/value projections expect (768 SD 1.x, 1024 SD 2.x, 2048 SDXL).

    Read from the shape of an `attn2.to_k` down/A matrix in the header; None when the LoRA has none.
    """
    if path.suffix != ".safetensors":
        return None
    try:
        header = safetensors_header(path)
    except (OSError, ValueError):
        return None
    for key, info in header.items():
        flat = key.replace("_", ".")
        if "attn2.to.k" in flat and any(m in flat for m in ("lora.A.", "lora.down.")) and len(info.get("shape", ())) == 2:
            return int(info["shape"][1])
    return None


def model_cross_attention_width(model: Resolved) -> int | None:
    """The UNet's cross_attention_dim from the model's (or its configs') unet/config.json."""
    folder = model.config if model.kind == "single_file" else model.path
    try:
        width = json.loads((Path(folder) / "unet" / "config.json").read_text())["cross_attention_dim"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(width[0] if isinstance(width, list) else width)


def folder_family(folder: Path) -> str:
    """The family (runner/families.py) whose pipeline model_index.json names; other SD-like folders: sdxl or sd."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return "sd"
    known = family_of_pipeline(str(index.get("_class_name", "")))
    if known is None:
        return "sdxl" if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index else "sd"
    for base, file, key, value, variant in VARIANTS:
        if base == known.name:
            try:
                config = index if file == "model_index.json" else json.loads((folder / file).read_text())
            except (OSError, ValueError):
                continue
            if config.get(key) == value:
                return variant
    return known.name


GGUF_MAGIC = b"GGUF"


def checkpoint_family(path: Path) -> tuple[str, str | None]:
    """(family, default config repo) of a single-file checkpoint, from its safetensors header or GGUF metadata.

    A .ckpt is a pickle (reading it means loading it), so it is taken as SD 1.x unless a config says otherwise.
    """
    if path.suffix == ".gguf":
        return gguf_family(path)
    if path.suffix != ".safetensors":
        return CHECKPOINTS[2][1:]
    found = checkpoint_family_of_keys(safetensors_keys(path))
    return found or ("sd", None)


def checkpoint_family_of_keys(keys: list[str]) -> tuple[str, str] | None:
    found = family_of_checkpoint_keys(keys)
    if found and found[0] == "flux" and not any(k.endswith("guidance_in.in_layer.weight") for k in keys):
        return "flux-schnell", "black-forest-labs/FLUX.1-schnell"  # schnell's transformer has no guidance embedding
    return found


def gguf_family(path: Path) -> tuple[str, str | None]:
    """(family, config repo) of a GGUF transformer from its tensor names (read from the header by the gguf library)."""
    info = gguf_info(path)
    found = checkpoint_family_of_keys(info["tensors"])
    if found is None:
        arch = info.get("architecture")
        family = next((f.name for f in FAMILIES.values() if arch and arch in f.gguf_architectures), None)
        found = (family, None) if family else None
    if found is None:
        raise ValueError(f"its tensors are of no family this version knows (architecture {info.get('architecture') or 'unknown'})")
    return found


def gguf_info(path: Path) -> dict[str, Any]:
    """A GGUF file's architecture, tensor names and quantization types, without reading its weights."""
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ValueError("reading GGUF files needs the gguf package (pip install gguf)") from exc
    reader = GGUFReader(str(path), "r")
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"architecture": arch, "tensors": [t.name for t in reader.tensors], "types": types}


def check_model_folder(entry: str, folder: Path) -> Problem | None:
    """Every component model_index.json names must be a folder beside it (`entry`: the config path, models.<id>)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        return Problem(f"{entry}.source", f"{folder}/model_index.json cannot be read ({exc})", "re-save the pipeline")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if not (folder / name).is_dir():
            return Problem(
                f"{entry}.source",
                f"{folder} has no '{name}' folder, which model_index.json lists",
                "copy the whole pipeline folder",
            )
    return None


def hub_cache_path(repo_id: str) -> Path | None:
    """The local snapshot of a hub repo, or None. Never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or hub library missing
        return None


def resolve_model(
    model_id: str, entry: Mapping[str, Any], hashes: HashCache, at: str | None = None
) -> tuple[Resolved | None, Problem | None]:
    """A diffusers folder, a hub id in the local cache, or a single-file checkpoint (+ the folder of its configs).

    `at` is where the entry sits in the config, for the error lines (default models.<id>).
    """
    at = at or f"models.{model_id}"
    source = entry["source"]
    where = f"{at}.source"
    path = Path(source).expanduser()
    if path.is_file():
        return _resolve_checkpoint(model_id, path, entry.get("config"), hashes, at)
    folder = path if path.is_dir() else None
    if folder is None and HUB_ID.match(source) and not source.endswith(WEIGHT_SUFFIXES):
        folder = hub_cache_path(source)
        if folder is None:
            return None, Problem(
                where,
                f"hub model '{source}' is not in the local Hugging Face cache (nothing is downloaded at run time)",
                f"pre-download it with: huggingface-cli download {source}",
            )
    if folder is None:
        return None, Problem(where, f"path {source} does not exist", "fix the path, or use a hub id already in the local cache")
    if not (folder / "model_index.json").exists():
        return None, Problem(where, f"{source} is a folder without model_index.json", "point it at a diffusers pipeline folder")
    problem = check_model_folder(at, folder)
    if problem:
        return None, problem
    variant = entry.get("variant")
    found = weight_variants(folder)
    if variant and variant not in found:
        return None, Problem(
            f"{at}.variant",
            f"{folder} has no '{variant}' weights (found: {', '.join(sorted(v or 'default' for v in found)) or 'none'})",
            "remove variant or download that variant",
        )
    if not variant and found and None not in found and len(found) == 1:
        variant = next(iter(found))  # only a variant is there (e.g. a folder of fp16 files): load it
    kind = "diffusers_folder" if path.is_dir() else "hub_cache"
    return Resolved(model_id, kind, folder, sha256=hashes.tree_sha256(folder), variant=variant, family=folder_family(folder)), None


def weight_variants(folder: Path) -> set[str | None]:
    """The weight variants a pipeline folder holds: None for the plain files, 'fp16' for *.fp16.safetensors..."""
    found: set[str | None] = set()
    for file in folder.glob("*/*"):
        if file.suffix in (".safetensors", ".bin"):
            parts = file.name.split(".")
            found.add(parts[-2] if len(parts) > 2 else None)
    return found


def _resolve_checkpoint(
    model_id: str, path: Path, config: str | None, hashes: HashCache, where: str
) -> tuple[Resolved | None, Problem | None]:
    """A single file: a whole SD/SDXL pipeline, or a DiT transformer (.safetensors in its original layout, or GGUF)."""
    if path.suffix not in (".safetensors", ".ckpt", ".gguf"):
        return None, Problem(
            f"{where}.source", f"{path} is not a .safetensors, .gguf or .ckpt checkpoint", "give a checkpoint file or a diffusers folder"
        )
    try:
        family, default_repo = checkpoint_family(path)
        quantization = gguf_quantization(path) if path.suffix == ".gguf" else ""
    except (OSError, ValueError) as exc:
        return None, Problem(
            f"{where}.source", f"{path.name} cannot be read as a checkpoint: {exc}", "use a checkpoint of a family README lists"
        )
    repo = config or default_repo
    if repo is None:
        return None, Problem(
            f"{where}.config",
            f"cannot tell which pipeline {path.name} is from its tensors",
            "set config to a diffusers folder of its family",
        )
    folder = Path(repo).expanduser()
    if not folder.is_dir():
        folder = hub_cache_path(repo) if HUB_ID.match(repo) else None
    if folder is None or not (folder / "model_index.json").exists():
        hint = f"pre-download its configs: huggingface-cli download {repo} --include '*.json' '*.txt'" if HUB_ID.match(repo) else ""
        return None, Problem(
            f"{where}.config",
            f"the single-file checkpoint needs the configs of '{repo}', which are not on disk (nothing is downloaded)",
            hint or "set config to a diffusers pipeline folder (its weights are not needed)",
        )
    if config:
        folder_is = folder_family(folder)
        if FAMILIES[family].single_file == "pipeline":
            family = folder_is  # the config decides which pipeline a whole-pipeline file becomes
        elif FAMILIES[folder_is].pipeline != FAMILIES[family].pipeline:
            return None, Problem(
                f"{where}.config",
                f"{path.name} is a {label(family)} transformer but {folder} is a {label(folder_is)} pipeline",
                f"set config to a {label(family)} diffusers folder",
            )
    mode = FAMILIES[family].single_file
    if mode is None:
        return None, Problem(f"{where}.source", f"single {label(family)} files are not loaded by this version", "use its diffusers folder")
    sha = hashes.file_sha256(path)
    if config:  # another config can mean another pipeline from the same weights
        sha = hashlib.sha256(f"{sha}:{hashes.tree_sha256(folder)}".encode()).hexdigest()
    kind = "single_file" if mode == "pipeline" else "transformer_file"
    return Resolved(model_id, kind, path, sha256=sha, config=folder, family=family, quantization=quantization), None


def gguf_quantization(path: Path) -> str:
    """'gguf:Q8_0' (the quantized types of a GGUF file's tensors; the float ones left as they are)."""
    quantized = [t for t in gguf_info(path)["types"] if t not in ("F32", "F16", "BF16")]
    return "gguf:" + "+".join(quantized) if quantized else "gguf"


def resolve_lora(lora_id: str, source: str, weight_name: str | None, hashes: HashCache) -> tuple[Resolved | None, Problem | None]:
    where = f"loras.{lora_id}.source"
    path = Path(source).expanduser()
    if path.is_dir() or (not path.exists() and HUB_ID.match(source) and not source.endswith(WEIGHT_SUFFIXES)):
        folder = path if path.is_dir() else hub_cache_path(source)
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
    models: dict[str, Resolved] = field(default_factory=dict)
    loras: dict[str, Resolved] = field(default_factory=dict)
    vaes: dict[str, Resolved] = field(default_factory=dict)
    embeddings: dict[str, Resolved] = field(default_factory=dict)
    upscaler: Resolved | None = None
    problems: list[Problem] = field(default_factory=list)
    triggers: dict[str, str] = field(default_factory=dict)  # LoRA id -> the trigger words the prompts get (entry or file)

    def files(self) -> dict[str, dict[str, Resolved]]:
        """Every resolved file by registry name ("models", "loras", ...), for identity, tags and hashes."""
        groups = {"models": self.models, "loras": self.loras, "vaes": self.vaes, "embeddings": self.embeddings}
        return groups | ({"upscaler": {"upscaler": self.upscaler}} if self.upscaler else {})

    def identity(self) -> dict[str, dict[str, str]]:
        """Each file's sha256 by registry name and id: the sweep folder's identity.json, to see files change between runs."""
        return {kind: {k: v.sha256 for k, v in group.items()} for kind, group in self.files().items()}

    def file_hashes(self) -> dict[str, str]:
        """Each file's sha256 by `model:id`, `lora:id`...: what the PNG text chunks name (A1111's hashes)."""
        return {f"{SINGULAR[kind]}:{k}": v.sha256 for kind, group in self.files().items() for k, v in group.items()}

    def file_tags(self) -> dict[str, str]:
        """`model.<id>.sha256` and `.short_hash` tags: every MLflow run of the sweep carries them."""
        tags = {}
        for kind, group in self.files().items():
            for k, v in group.items():
                tags |= {f"{SINGULAR[kind]}.{k}.sha256": v.sha256, f"{SINGULAR[kind]}.{k}.short_hash": v.short_hash}
        for k, info in self.lora_files().items():  # what each LoRA file says about itself (runner/checkpoints.py: lora_info)
            tags |= {
                f"lora.{k}.{name}": info[name] for name in ("tool", "network", "base", "trigger", "rank", "epoch", "step") if name in info
            }
        return tags

    def lora_files(self) -> dict[str, dict[str, str]]:
        """Each LoRA file's metadata (tool, base, network, rank, alpha, epoch, step, resolution) and the trigger its
        prompts get: the sweep folder's loras.json, the report's files table and the MLflow tags."""
        files = {}
        for k, v in sorted(self.loras.items()):
            if v.path.suffix == ".safetensors" and v.path.exists():
                info = {"file": v.path.name, **lora_info(v.path, safetensors_keys(v.path))}
                if k in self.triggers:
                    info["trigger"] = self.triggers[k]
                files[k] = info
        return files


# the keys each registry entry may have: the fields of its dataclass in runner/config.py
ENTRY_KEYS = {
    name: tuple(f.name for f in fields(schema))
    for name, schema in {"models": ModelSource, "loras": LoraSource, "vaes": VaeSource, "embeddings": EmbeddingSource}.items()
}
FIELD_OF = {"models": "model_id", "loras": "lora_model", "vaes": "vae", "embeddings": "embeddings_model"}
WHAT = {"models": "model", "loras": "LoRA", "vaes": "VAE", "embeddings": "embeddings"}
SINGULAR = {"models": "model", "loras": "lora", "vaes": "vae", "embeddings": "embeddings", "upscaler": "upscaler"}


def changed_files(before: dict[str, dict[str, str]], now: dict[str, dict[str, str]]) -> list[str]:
    """Lines naming each model, LoRA, VAE... whose file changed since the last run of this sweep."""
    lines = []
    for kind, group in now.items():
        for name, sha in group.items():
            old = before.get(kind, {}).get(name)
            if old and sha and old != sha:
                lines.append(
                    f"{WHAT.get(kind, kind)} '{name}' changed on disk since the last run (sha256 {old[:10]} -> {sha[:10]}): "
                    "its images get new ids and are generated again"
                )
    return lines


def check_entry(registry: str, name: str, entry: Any) -> Problem | None:
    """A registry entry is a mapping with a `source` and known keys only."""
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


def resolve_vae(vae_id: str, entry: Mapping[str, Any], hashes: HashCache) -> tuple[Resolved | None, Problem | None]:
    """A VAE: a diffusers AutoencoderKL folder (config.json + weights) or a single file (configs from the model)."""
    path = Path(entry["source"]).expanduser()
    where = f"vaes.{vae_id}.source"
    if path.is_dir():
        if not (path / "config.json").exists():
            return None, Problem(where, f"{path} has no config.json", "point it at a diffusers AutoencoderKL folder (e.g. .../vae)")
        return Resolved(vae_id, "diffusers_folder", path, sha256=hashes.tree_sha256(path)), None
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt"):
            return None, Problem(where, f"{path.name} is not a .safetensors/.ckpt/.pt VAE", "give a VAE file or folder")
        config = Path(entry["config"]).expanduser() if entry.get("config") else None
        if config is not None and not (config / "config.json").exists():
            return None, Problem(f"vaes.{vae_id}.config", f"{config} has no config.json", "point it at an AutoencoderKL folder")
        return Resolved(vae_id, "vae_file", path, sha256=hashes.file_sha256(path), config=config), None
    return None, Problem(where, f"path {path} does not exist", "fix the path in the vaes registry")


def resolve_embedding(name: str, entry: Mapping[str, Any], hashes: HashCache) -> tuple[Resolved | None, Problem | None]:
    """A textual inversion file (A1111 .pt/.safetensors or diffusers learned_embeds); its token defaults to its id."""
    path = Path(entry["source"]).expanduser()
    if not path.is_file():
        return None, Problem(
            f"embeddings.{name}.source", f"embeddings file {path} does not exist", "fix the path in the embeddings registry"
        )
    family = "sd"
    if path.suffix == ".safetensors":
        try:
            keys = safetensors_keys(path)
        except (OSError, ValueError) as exc:
            return None, Problem(f"embeddings.{name}.source", f"{path.name} is not a readable .safetensors file ({exc})", "re-download it")
        family = "sdxl" if {"clip_l", "clip_g"} <= set(keys) else "sd"
    token = str(entry.get("token") or name)
    return Resolved(name, "embedding_file", path, sha256=hashes.file_sha256(path), family=family, token=token), None


def resolve_all(
    entries: Mapping[str, Mapping[str, Any]],
    wanted: Mapping[str, set[str]],
    hashes: HashCache,
    upscaler: Mapping[str, Any] | None = None,
) -> Registry:
    """Resolve and hash the files a plan uses (`wanted`: registry name -> ids); unknown ids become problems."""
    registry = Registry()
    resolvers = {
        "models": lambda i, e: resolve_model(i, e, hashes),
        "loras": lambda i, e: resolve_lora(i, e["source"], e.get("weight_name"), hashes),
        "vaes": lambda i, e: resolve_vae(i, e, hashes),
        "embeddings": lambda i, e: resolve_embedding(i, e, hashes),
    }
    builtin_kind = {"models": "diffusers_folder", "loras": "lora_file"}
    for name, resolve in resolvers.items():
        known, found = entries.get(name) or {}, getattr(registry, name)
        for item in sorted(wanted.get(name, ())):
            if item not in known:
                registry.problems.append(_unknown(FIELD_OF[name], item, known, name))
                continue
            spec = known[item]
            if problem := check_entry(name, item, spec) or (adapter_name_problem(item) if name == "loras" else None):
                registry.problems.append(problem)
                continue
            if spec.get("builtin") and not Path(spec["source"]).exists():  # built on first use; its recipe is its identity
                found[item] = Resolved(item, builtin_kind[name], Path(spec["source"]), builtin=True)
                continue
            resolved, problem = resolve(item, spec)
            if problem:
                registry.problems.append(problem)
            else:
                found[item] = replace(resolved, builtin=bool(spec.get("builtin")))
    if upscaler and upscaler.get("source"):
        registry.upscaler, problem = resolve_model("upscaler", upscaler, hashes, at="upscaler")
        if problem:
            registry.problems.append(problem)
    hashes.save()
    return registry


# peft keeps each adapter under its name in torch ModuleDicts: a name with a dot, or one of torch.nn.Module's own
# attributes, cannot be an adapter name (torch 2.x; the list is data so that planning needs no torch)
MODULE_ATTRIBUTES = frozenset(
    "add_module apply bfloat16 buffers children compile cpu cuda double eval extra_repr float forward get_buffer "
    "get_parameter get_submodule half ipu load_state_dict modules mtia named_buffers named_children named_modules "
    "named_parameters parameters register_buffer register_module register_parameter requires_grad_ share_memory "
    "state_dict to to_empty train training type xpu zero_grad".split()
)


def adapter_name_problem(lora_id: str) -> Problem | None:
    """A LoRA id peft cannot use as its adapter name, refused before the model loads rather than mid-sweep."""
    if "." in lora_id or lora_id in MODULE_ATTRIBUTES:
        why = "has a dot" if "." in lora_id else f"is a name torch modules already use ({lora_id})"
        fix = f"rename the entry, e.g. loras.{lora_id.replace('.', '_')}_lora" if "." not in lora_id else "use _ or - instead of ."
        return Problem(f"loras.{lora_id}", f"this id {why}, and peft names the LoRA's layers by it", fix)
    return None


def _unknown(field: str, name: str, known: Mapping[str, Any], registry: str) -> Problem:
    guess = closest(name, known)
    fix = f"did you mean '{guess}'?" if guess else f"add it under `{registry}:` in the config"
    return Problem(field, f"unknown {WHAT[registry]} id '{name}'", f"{fix} (known: {', '.join(known) or 'none'})")
