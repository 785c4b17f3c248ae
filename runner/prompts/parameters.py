"""Read the A1111/Forge `parameters` text of an image (its infotext) into a base request of lora-sweep's fields.

The text is what A1111 and Forge write into a PNG's `parameters` chunk (and a JPEG's or WebP's EXIF
UserComment), what CivitAI shows as "generation data", what ComfyUI exporters imitate, and what
runner/image_file.py writes for every lora-sweep image:

    a red fox in the snow, <lora:sunset:0.6>           <- the prompt: every line up to `Negative prompt:`
    Negative prompt: blurry,                           <- the negative prompt: up to the settings line
    lowres                                             <-   (it may have several lines)
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

The settings line is the last line when it holds at least three `key: value` pairs (A1111's own test);
values with commas are JSON-quoted (`Lora hashes: "a: 0123456789ab, b: ba9876543210"`), some extensions
write raw JSON objects or lists (`Hashes: {...}`, `Civitai resources: [...]`), which are read whole.
Like A1111, every prompt line is stripped and a missing `Clip skip` means 1.

The hashes, as A1111 writes them (CivitAI's names in brackets):

- `Model hash`: sha256 of the checkpoint file, first 10 hex digits (AutoV2); texts from before late 2022
  have 8 digits, a hash of 64 KiB of the file (AutoV1), which a full sha256 cannot be compared with.
- `VAE hash`: sha256 of the file, first 10 hex digits (AutoV2).
- `Lora hashes`: 12 hex digits; for a .safetensors LoRA the sha256 of the tensor data after the JSON
  header (kohya's and the Additional Networks hash, CivitAI's AutoV3, also stored in a file's
  `sshs_model_hash` metadata), for .pt/.ckpt LoRAs the file's sha256. Each name is the name the tag used,
  without `:` and `,`. lora-sweep writes the file's sha256 (first 12 digits) there.
- `TI hashes`: the embedding file's sha256, first 12 hex digits.
- `Hashes: {"model": ..., "vae": ..., "lora:NAME": ..., "embed:NAME": ...}` (CivitAI's extension and
  some ComfyUI exporters): AutoV2, 10 hex digits.

`base_request` matches each file by hash first (a hash matches a registry file whose sha256 starts with
it, or whose AutoV3, when registry_files gives one, starts with it; at least 10 digits), then by name
(the registry id, or the file's name without folder and extension, ignoring case). `tensor_data_hash`
computes the AutoV3 of a .safetensors file for callers that want A1111's LoRA hashes to match.

LoRAs: `<lora:...>` / `<lyco:...>` tags stay in the prompt (the prompt parser, runner/prompts/syntax.py,
turns them into the blend); a tag whose LoRA is in the registry under another id is renamed to that id; a
tag that matches nothing is one line. LoRAs applied outside the prompt (lora-sweep's own images: `Lora
hashes` with `Lora weights`) become `lora_model` / `lora_strength`. A LoRA named in `Lora hashes` but
neither tagged in the prompt nor given a weight was applied by another pass (A1111 lists the LoRAs of the
Hires fix and ADetailer prompts there too): one line, not applied.

Everything the image did that the request cannot do (Hires fix, ADetailer, a refiner, img2img, variation
seeds, ControlNet, unknown settings) is one line each, starting `from_image: `; nothing is dropped silently.
Pure: no torch, no I/O (except `read_parameters` and `tensor_data_hash`, which read a file).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.request import format_number, join_strengths, split_strengths

PREFIX = "from_image: "
# a settings line has at least this many pairs and one of these keys (A1111 only counts the pairs)
MIN_PAIRS = 3
CORE_KEYS = frozenset({"steps", "sampler", "cfg scale", "seed", "size", "model", "model hash"})
# settings that do not change the pixels (or that base_request reads elsewhere): no line
INFORMATIONAL = frozenset(
    {
        "version",
        "template",
        "negative template",
        "hashes",
        "time taken",
        "hardware info",
        "batch size",
        "batch pos",
        "civitai metadata",
        "lora-sweep id",
        "adetailer version",
        "user",
        "created date",
        "comment",
        "comments",
    }
)
# a default value of these settings changes nothing: no line for it
DEFAULTS = {
    "emphasis": "original",
    "rng": "gpu",
    "vae encoder": "full",
    "vae decoder": "full",
    "fp8 weight": "disable",
    "seed resize from": "-1x-1",
    "diffusion in low bits": "automatic",
    "ensd": "0",
    "eta noise seed delta": "0",
}
IMG2IMG_KEYS = frozenset(
    {
        "denoising strength",
        "mask blur",
        "masked content",
        "inpaint area",
        "masked area padding",
        "mask mode",
        "inpainting fill",
        "conditional mask weight",
        "image cfg scale",
        "soft inpainting",
    }
)
# why a setting lora-sweep has no field for is not applied, where more can be said than "no such setting"
REASONS = {
    "rng": "lora-sweep draws the noise from the seed with its own generator",
    "ensd": "lora-sweep draws the noise from the seed with its own generator",
    "eta noise seed delta": "lora-sweep draws the noise from the seed with its own generator",
    "eta": "lora-sweep's schedulers run with their default eta",
    "eta ddim": "lora-sweep's schedulers run with their default eta",
    "sgm noise multiplier": "lora-sweep's schedulers run with their defaults",
    "emphasis": "lora-sweep weights prompts as A1111's default (Original) does",
    "token merging ratio": "lora-sweep's tomesd is a yes/no field with its own ratio",
    "tiled diffusion": "lora-sweep generates the image in one piece",
    "tiled vae": "lora-sweep decodes the image in one piece",
    "pad conds": "lora-sweep pads prompts as diffusers does",
    "diffusion in low bits": "lora-sweep loads the model's weights as engine.quantize says",
    "skip early cfg": "lora-sweep applies guidance at every step",
    "ngms": "lora-sweep applies guidance at every step",
}
VARIATION_KEYS = ("variation seed", "variation seed strength", "seed resize from")
REFINER_KEYS = ("refiner", "refiner switch at", "refiner switch by sampling steps")
HYPERNET_KEYS = ("hypernet", "hypernet hash", "hypernet strength")
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
HEX = re.compile(r"^[0-9a-f]+$")
MIN_HASH = 10  # digits a hash needs before it is compared (AutoV1 and Additional Networks' legacy hash have 8)
NETWORK_TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)
HYPERNET_TAG = re.compile(r"<hypernet:([^>]*)>", re.IGNORECASE)
SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
INLINE_STEPS = re.compile(r"(?:^|(?<=[\s,.]))Steps: *\d+ *,")
UNIT_SUFFIX = re.compile(r" (\d+(?:st|nd|rd|th))$")

# what registry_files holds: kind -> id -> (sha256, file name) or (sha256, file name, AutoV3)
RegistryFiles = Mapping[str, Mapping[str, Sequence[str]]]


def _key(name: str) -> str:
    """A settings key as compared: case and runs of spaces ignored ('CFG Scale' is 'cfg scale')."""
    return " ".join(name.lower().split())


def _line(text: str) -> str:
    return PREFIX + text


@dataclass(frozen=True)
class NetworkTag:
    """One `<lora:...>` / `<lyco:...>` tag of a prompt, as A1111 reads it."""

    kind: str  # "lora" or "lyco", as written
    name: str
    weight: float  # the first number (the text encoder's in A1111; the whole LoRA's here); 1 when not given
    unet_weight: float | None  # A1111's second number or `unet=`: the UNet's weight, when given
    extra: tuple[str, ...]  # other arguments (`dyn=8`, `lbw=...`), as written
    text: str  # the tag as written
    start: int  # where it is in the prompt
    end: int
    unreadable: str = ""  # a weight that is not a number (then 1 is used)


@dataclass
class Parameters:
    """An image's parameters text, read: the prompts, the settings (raw and unquoted) and the prompt's LoRA tags."""

    prompt: str = ""
    negative_prompt: str = ""
    settings: dict[str, str] = field(default_factory=dict)  # key as written -> value, unquoted (the last of a repeated key)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # every key/value of the settings line, in order, values as written
    settings_line: str = ""
    tags: list[NetworkTag] = field(default_factory=list)  # the prompt's tags
    negative_tags: list[NetworkTag] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what could not be read, one line each

    def get(self, key: str, default: str | None = None) -> str | None:
        """A setting by name, ignoring case and spacing ('cfg scale', 'CFG Scale')."""
        wanted = _key(key)
        for name, value in reversed(self.settings.items()):
            if _key(name) == wanted:
                return value
        return default

    @property
    def lora_hashes(self) -> dict[str, str]:
        """`Lora hashes` as name -> hash (lower case)."""
        return _name_hashes(self.get("Lora hashes"))

    @property
    def ti_hashes(self) -> dict[str, str]:
        """`TI hashes` as name -> hash (lower case)."""
        return _name_hashes(self.get("TI hashes"))

    @property
    def hashes(self) -> dict[str, str]:
        """The `Hashes` JSON object (`model`, `vae`, `lora:NAME`, `embed:NAME` -> hash), or {}."""
        return {k: v.lower() for k, v in _json_value(self.get("Hashes"), dict).items() if isinstance(v, str)}


# ---------------------------------------------------------------- reading the text


def parse_parameters(text: str) -> Parameters:
    """An image's `parameters` text -> its prompt, negative prompt, settings and LoRA tags. Never raises."""
    params = Parameters()
    if not isinstance(text, str) or not text.strip():
        params.lines.append(_line("the parameters text is empty"))
        return params
    lines = text.strip().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    last = lines[-1]
    pairs, unread = _split_settings(last)
    inline = INLINE_STEPS.search(last)  # one-line exports: 'prompt.,.Negative prompt: ...Steps: 4, Sampler: ...'
    if inline and inline.start() > 0 and not _split_settings(last[: inline.start()])[0]:
        head, tail = last[: inline.start()], last[inline.start() :]
        pairs, unread = _split_settings(tail)
        if _is_settings(pairs):
            cut = head.find("Negative prompt:")
            before, after = (head, None) if cut < 0 else (head[:cut], head[cut + len("Negative prompt:") :])
            lines[-1:] = ([before.strip(" ,.")] if before.strip(" ,.") or after is None else []) + (
                [] if after is None else ["Negative prompt: " + after.strip(" ,.")]
            )
            params.settings_line = tail.strip()
            params.lines.append(_line(f"the settings line began inside the prompt's last line: read from '{_short(tail, 30)}'"))
        else:
            pairs, unread = [], []
            params.lines.append(_line("no settings line (`Steps: ..., Sampler: ...`) found: only the prompts were read"))
    elif _is_settings(pairs):
        lines = lines[:-1]
        params.settings_line = last.strip()
    else:
        pairs, unread = [], []
        params.lines.append(_line("no settings line (`Steps: ..., Sampler: ...`) found: only the prompts were read"))
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    params.prompt = "\n".join(prompt)
    params.negative_prompt = "\n".join(negative)
    for key, raw in pairs:
        value, problem = _unquote(raw)
        if problem:
            params.lines.append(_line(f"'{key}: {_short(raw, 60)}' {problem}"))
        if key in params.settings and params.settings[key] != value:
            params.lines.append(
                _line(f"'{key}' is written twice ('{_short(params.settings[key], 40)}', '{_short(value, 40)}'): the last is read")
            )
            del params.settings[key]  # keep the order of the last one
        params.settings[key] = value
        params.pairs.append((key, raw))
    for fragment in unread:
        params.lines.append(_line(f"'{_short(fragment, 60)}' in the settings line is not a `key: value` pair: not read"))
    params.tags, problems = _network_tags(params.prompt)
    params.lines += problems
    params.negative_tags, problems = _network_tags(params.negative_prompt)
    params.lines += problems
    return params


def _is_settings(pairs: list[tuple[str, str]]) -> bool:
    return len(pairs) >= MIN_PAIRS and bool({_key(k) for k, _ in pairs} & CORE_KEYS)


def _split_settings(line: str) -> tuple[list[tuple[str, str]], list[str]]:
    """`k: v, k2: "v, with commas", k3: {...}` -> ([(k, raw v), ...], [fragments that are not pairs])."""
    pairs: list[tuple[str, str]] = []
    unread: list[str] = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " \t,":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and line[j] not in ':,"{[':
            j += 1
        key = line[i:j].strip()
        if j >= n or line[j] != ":" or not key or not (key[0].isalnum() or key[0] == "_"):
            end = line.find(",", j)
            end = n if end < 0 else end
            if line[i:end].strip():
                unread.append(line[i:end].strip())
            i = end + 1
            continue
        value, i = _read_value(line, j + 1)
        pairs.append((key, value))
    return pairs, unread


def _read_value(line: str, i: int) -> tuple[str, int]:
    """The raw value starting at i (a JSON string, a balanced {...} / [...], or text up to a comma) and where the next pair starts."""
    n = len(line)
    while i < n and line[i] in " \t":
        i += 1
    end = -1
    if i < n and line[i] == '"':
        end = _string_end(line, i)
    elif i < n and line[i] in "{[":
        end = _bracket_end(line, i)
    if end >= 0:  # the closed value, and whatever follows it up to the next comma
        comma = line.find(",", end + 1)
        comma = n if comma < 0 else comma
        return line[i:comma].strip(), comma + 1
    comma = line.find(",", i)
    comma = n if comma < 0 else comma
    return line[i:comma].strip(), comma + 1


def _string_end(line: str, i: int) -> int:
    """The index of the quote closing the JSON string that opens at i, or -1."""
    j = i + 1
    while j < len(line):
        if line[j] == "\\":
            j += 2
            continue
        if line[j] == '"':
            return j
        j += 1
    return -1


def _bracket_end(line: str, i: int) -> int:
    """The index of the bracket closing the one at i (strings skipped), or -1."""
    depth = 0
    j = i
    while j < len(line):
        c = line[j]
        if c == '"':
            j = _string_end(line, j)
            if j < 0:
                return -1
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _unquote(raw: str) -> tuple[str, str]:
    """A raw value -> (value, problem): JSON strings decoded, anything else as written."""
    if raw.startswith('"'):
        if len(raw) >= 2 and raw.endswith('"'):
            try:
                value = json.loads(raw)
                if isinstance(value, str):
                    return value, ""
            except ValueError:
                pass
            return raw[1:-1], ""
        return raw.lstrip('"'), "has an unclosed quote: read up to the next comma"
    if raw[:1] and raw[0] in "{[" and _bracket_end(raw, 0) < 0:
        return raw, "has an unclosed bracket: read up to the next comma"
    return raw, ""


def _json_value(value: str | None, kind: type) -> Any:
    if not value:
        return kind()
    try:
        parsed = json.loads(value)
    except ValueError:
        return kind()
    return parsed if isinstance(parsed, kind) else kind()


def _name_hashes(value: str | None) -> dict[str, str]:
    """'a: 0123abcd, b: ...' -> {'a': '0123abcd', 'b': ...} (entries without a hash map to '')."""
    out: dict[str, str] = {}
    for item in (value or "").split(","):
        name, _, digest = item.strip().rpartition(":")
        if not name:
            name, digest = digest, ""
        if name.strip():
            out[name.strip()] = digest.strip().lower()
    return out


def _network_tags(prompt: str) -> tuple[list[NetworkTag], list[str]]:
    tags: list[NetworkTag] = []
    lines: list[str] = []
    for match in NETWORK_TAG.finditer(prompt):
        kind, body = match.group(1), match.group(2)
        args = body.split(":")
        name = args[0].strip()
        if not name:
            lines.append(_line(f"'{match.group(0)}' names no LoRA: left as text"))
            continue
        positional = [a.strip() for a in args[1:] if "=" not in a]
        named = {a.split("=", 1)[0].strip().lower(): a.split("=", 1)[1].strip() for a in args[1:] if "=" in a}
        unreadable = ""
        weight = 1.0
        first = named.pop("te", positional[0] if positional else "")
        if first:
            try:
                weight = float(first)
            except ValueError:
                unreadable = first
        unet_text = named.pop("unet", positional[1] if len(positional) > 1 else "")
        unet: float | None = None
        if unet_text:
            try:
                unet = float(unet_text)
            except ValueError:
                unreadable = unreadable or unet_text
        extra = tuple(positional[2:]) + tuple(f"{k}={v}" for k, v in named.items())
        tags.append(NetworkTag(kind, name, weight, unet, extra, match.group(0), match.start(), match.end(), unreadable))
    return tags, lines


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------- the registry, as plain data


@dataclass(frozen=True)
class _File:
    id: str
    sha256: str
    file_name: str
    autov3: str


class _Catalog:
    """One kind of registry_files ("loras": {id: (sha256, file_name[, autov3])}), matched by hash, then by name."""

    def __init__(self, entries: Mapping[str, Sequence[str]] | None):
        self.files: list[_File] = []
        for file_id, entry in (entries or {}).items():
            values = [str(v or "") for v in (entry if isinstance(entry, (list, tuple)) else (entry,))]
            values += [""] * (3 - len(values))
            self.files.append(_File(str(file_id), values[0].lower(), values[1], values[2].lower()))

    def by_hash(self, digest: str | None) -> _File | None:
        digest = (digest or "").strip().lower()
        if len(digest) < MIN_HASH or not HEX.match(digest):
            return None
        for f in self.files:
            if (f.sha256 and f.sha256.startswith(digest)) or (f.autov3 and f.autov3.startswith(digest)):
                return f
        return None

    def by_name(self, name: str | None) -> _File | None:
        wanted = _stem(name or "")
        if not wanted:
            return None
        exact = [f for f in self.files if _fold(f.id) in (wanted, _fold(name or ""))]
        named = [f for f in self.files if f.file_name and _stem(f.file_name) == wanted]
        found = exact or named
        return found[0] if found else None

    def find(self, name: str | None, digests: Sequence[str | None]) -> tuple[_File | None, str]:
        """The file by the first digest that matches, else by name -> (file, 'hash' | 'name' | '')."""
        for digest in digests:
            found = self.by_hash(digest)
            if found:
                return found, "hash"
        found = self.by_name(name)
        return (found, "name") if found else (None, "")


def _fold(text: str) -> str:
    return text.strip().casefold().translate(str.maketrans("", "", ":,"))


def _stem(name: str) -> str:
    """'SDXL\\juggernaut_v9.safetensors [a1b2c3d4e5]' -> 'juggernaut_v9' (folded)."""
    name = re.sub(r"\s*\[[0-9a-fA-F]{8,}\]\s*$", "", name.strip())
    name = re.split(r"[\\/]", name)[-1]
    lower = name.lower()
    for suffix in FILE_SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _fold(name)


# ---------------------------------------------------------------- the base request


def base_request(params: Parameters, registry_files: RegistryFiles) -> tuple[dict[str, Any], list[str]]:
    """The request fields an image's parameters give, and one `from_image: ` line for each thing not applied.

    `registry_files` is {"models" | "loras" | "embeddings" | "vaes": {id: (sha256, file_name)}} (a third item,
    the AutoV3 hash of a .safetensors file, lets A1111's LoRA hashes match too). The request holds only what
    the image says (prompt, negative_prompt, num_inference_steps, scheduler, guidance_scale, seed, width,
    height, clip_skip, and model_id, vae, lora_model, lora_strength, embeddings_model where matched; Forge's
    Distilled CFG Scale and Shift too); the caller adds the sweep's defaults.
    """
    reader = _Reader(params, registry_files or {})
    return reader.run()


class _Reader:
    def __init__(self, params: Parameters, files: RegistryFiles):
        self.params = params
        self.catalogs = {kind: _Catalog(files.get(kind)) for kind in ("models", "loras", "embeddings", "vaes")}
        self.request: dict[str, Any] = {}
        self.lines: list[str] = list(params.lines)
        self.used: set[str] = set()  # settings keys read (folded)
        self.hashes = params.hashes

    def get(self, key: str) -> str | None:
        self.used.add(_key(key))
        return self.params.get(key)

    def note(self, text: str) -> None:
        self.lines.append(_line(text))

    def run(self) -> tuple[dict[str, Any], list[str]]:
        p = self.params
        self.request["prompt"] = p.prompt
        self.request["negative_prompt"] = p.negative_prompt
        if not p.prompt.strip():
            self.note("the image has no prompt")
        self._numbers()
        self._scheduler()
        self._model()
        self._vae()
        self._loras()
        self._embeddings()
        self._passes()
        self._rest()
        return self.request, self.lines

    # -- the plain settings

    def _number(self, key: str, kind: type, field_name: str) -> Any:
        text = self.get(key)
        if text is None or text.strip() == "":
            return None
        try:
            if kind is int:
                try:
                    value: Any = int(text.strip())  # exact, also for ComfyUI's 64-bit seeds
                except ValueError:
                    as_float = float(text)
                    if not as_float.is_integer():
                        raise
                    value = int(as_float)
            else:
                value = float(text)
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError
        except ValueError:
            self.note(f"{key} '{_short(text, 30)}' is not {'an integer' if kind is int else 'a number'}: {field_name} is left to the sweep")
            return None
        return value

    def _numbers(self) -> None:
        steps = self._number("Steps", int, "num_inference_steps")
        if steps is not None:
            self.request["num_inference_steps"] = steps
        distilled = self._number("Distilled CFG Scale", float, "guidance_scale")
        cfg = self._number("CFG scale", float, "guidance_scale")
        if distilled is not None:  # Forge, Flux-like models: the guidance embedding is diffusers' guidance_scale
            self.request["guidance_scale"] = distilled
            if cfg is not None and cfg != 1:
                self.request["true_cfg_scale"] = cfg
        elif cfg is not None:
            self.request["guidance_scale"] = cfg
        seed = self._number("Seed", int, "seed")
        if seed is not None:
            if seed < 0:
                self.note(f"Seed {seed} means a random seed: seed is left to the sweep")
            else:
                self.request["seed"] = seed
                if seed >= 2**32:
                    self.note(f"Seed {seed} is above lora-sweep's seed range 0..{2**32 - 1} (a ComfyUI seed?): the request will be refused")
        size = self.get("Size")
        if size:
            m = SIZE.match(size)
            if m:
                self.request["width"], self.request["height"] = int(m.group(1)), int(m.group(2))
            else:
                self.note(f"Size '{_short(size, 30)}' is not WIDTHxHEIGHT: width and height are left to the sweep")
        clip_skip = self._number("Clip skip", int, "clip_skip")
        self.request["clip_skip"] = 1 if clip_skip is None else clip_skip  # A1111: a missing Clip skip is 1
        shift = self._number("Shift", float, "shift")
        if shift is not None:
            self.request["shift"] = shift

    def _scheduler(self) -> None:
        sampler = (self.get("Sampler") or "").strip()
        schedule = (self.get("Schedule type") or self.get("Scheduler") or "").strip()
        if not sampler:
            if schedule:
                self.note(f"Schedule type {schedule} without a Sampler: scheduler is left to the sweep")
            return
        if schedule and schedule.lower() != "automatic" and not sampler.lower().endswith(" " + schedule.lower()):
            sampler = f"{sampler} {schedule}"
        self.request["scheduler"] = sampler  # the web UI's name ("DPM++ 2M Karras"), or lora-sweep's class name

    # -- files

    def _model(self) -> None:
        name = self.get("Model")
        digest = self.get("Model hash")
        found, how = self.catalogs["models"].find(name, [digest, self.hashes.get("model")])
        if found:
            self.request["model_id"] = found.id
            self._name_match_note("model", name, found, how, digest)
        elif name or digest:
            self.note(
                f"model '{name or '?'}'{_hash_text(digest)} matches no registry model by hash or name{_legacy(digest, 'models')}: "
                "model_id is left to the sweep (add the checkpoint to the models registry)"
            )

    def _vae(self) -> None:
        name = self.get("VAE")
        digest = self.get("VAE hash")
        catalog = self.catalogs["vaes"]
        if name or digest or self.hashes.get("vae"):
            found, how = catalog.find(name, [digest, self.hashes.get("vae")])
            if found:
                self.request["vae"] = found.id
                self._name_match_note("VAE", name, found, how, digest)
            else:
                self.note(f"VAE '{name or '?'}'{_hash_text(digest)} matches no registry VAE by hash or name: the model's own VAE is used")
        for key, value in self.params.settings.items():  # Forge: `Module 1: ae, Module 2: clip_l` (the VAE and text encoders)
            folded = _key(key)
            if not re.fullmatch(r"module \d+", folded):
                continue
            self.used.add(folded)
            found = catalog.by_name(value)
            if found and "vae" not in self.request:
                self.request["vae"] = found.id
            elif not found:
                self.note(
                    f"{key}: {value} (a Forge VAE or text encoder) is not applied: lora-sweep loads the model's own, or the vae field's VAE"
                )

    def _name_match_note(self, what: str, name: str | None, found: _File, how: str, digest: str | None) -> None:
        """A file matched by name while the image gave a hash of another file: say so (a different version?)."""
        digest = (digest or "").strip().lower()
        if how != "name" or len(digest) < MIN_HASH or not HEX.match(digest) or not found.sha256:
            return
        if what == "LoRA" and not found.autov3:
            self.note(
                f"LoRA '{name}' is registry '{found.id}' by name; its hash {digest} is not the file's sha256 "
                "(A1111 hashes a .safetensors LoRA's tensor data, AutoV3, which registry_files does not give): not compared"
            )
        else:
            self.note(
                f"{what} '{name}' is registry '{found.id}' by name, but the image's hash {digest} is not that file's: another version?"
            )

    # -- LoRAs

    def _loras(self) -> None:
        p = self.params
        self.used |= {"lora hashes", "lora weights"}
        catalog = self.catalogs["loras"]
        hashes = p.lora_hashes
        hashes_folded = {_fold(k): v for k, v in hashes.items()}
        json_hashes = {_fold(k[5:]): v for k, v in self.hashes.items() if k.startswith("lora:")}
        prompt = p.prompt
        tagged: set[str] = set()  # folded names of tags and their registry ids
        renames: list[tuple[NetworkTag, str]] = []
        for tag in p.tags:
            folded = _fold(tag.name)
            digest = hashes_folded.get(folded) or json_hashes.get(folded)
            found, how = catalog.find(tag.name, [digest])
            tagged.add(folded)
            if tag.unreadable:
                self.note(f"'{tag.text}': the weight '{tag.unreadable}' is not a number: 1 is used")
            if tag.unet_weight is not None and tag.unet_weight != tag.weight:
                self.note(
                    f"'{tag.text}': the first weight {format_number(tag.weight)} is used for the whole LoRA; "
                    f"the second (UNet) weight {format_number(tag.unet_weight)} is not applied: one strength per LoRA"
                )
            if tag.extra:
                self.note(f"'{tag.text}': {', '.join(tag.extra)} is not applied: lora-sweep reads a name and one strength")
            if not found:
                self.note(
                    f"LoRA tag '{tag.text}'{_hash_text(digest)} matches no registry LoRA by hash or name: add it to the loras registry"
                )
                continue
            tagged.add(_fold(found.id))
            self._name_match_note("LoRA", tag.name, found, how, digest)
            if found.id != tag.name:
                renames.append((tag, found.id))
        for tag, new_name in reversed(renames):  # from the end, so the earlier tags' places stay right
            body = tag.text[len(tag.kind) + 2 : -1]  # the text between `<lora:` and `>`
            prompt = prompt[: tag.start] + f"<{tag.kind}:{new_name}{body[len(body.split(':')[0]) :]}>" + prompt[tag.end :]
        self.request["prompt"] = prompt
        for tag in p.negative_tags:
            self.note(f"'{tag.text}' in the negative prompt is not applied: LoRAs are applied from the prompt's tags")
        for tag in HYPERNET_TAG.finditer(p.prompt):
            self.note(f"'{tag.group(0)}' (a hypernetwork) is not applied: lora-sweep has no hypernetworks")
        listed = list(hashes.items())
        weights = self._lora_weights(p.get("Lora weights"), len(listed))
        ids, strengths = [], []
        for i, (name, digest) in enumerate(listed):
            found, how = catalog.find(name, [digest])
            if _fold(name) in tagged or (found and _fold(found.id) in tagged):
                continue  # applied by its tag
            if weights is None:
                known = f" (registry '{found.id}')" if found else ""
                where = next((k for k, v in p.settings.items() if re.search(rf"<(?:lora|lyco):{re.escape(name)}[:>]", v, re.I)), None)
                why = (
                    f"it is tagged in {where}, a pass lora-sweep does not run"
                    if where
                    else "A1111 lists the LoRAs of other passes' prompts there too"
                )
                self.note(f"LoRA '{name}'{known} is in Lora hashes but not tagged in the prompt ({why}): not applied")
            elif not found:
                self.note(f"LoRA '{name}'{_hash_text(digest)} matches no registry LoRA by hash or name: left out of lora_model")
            else:  # lora-sweep's own images: the blend of lora_model, with `Lora weights`
                self._name_match_note("LoRA", name, found, how, digest)
                ids.append(found.id)
                strengths.append(weights[i])
        if ids:
            self.request["lora_model"] = ",".join(ids)
            self.request["lora_strength"] = join_strengths(strengths)
        self._civitai_resources(tagged | {_fold(n) for n, _ in listed})

    def _lora_weights(self, text: str | None, count: int) -> list[float] | None:
        """lora-sweep's `Lora weights: "0.5,0.75"` (one per `Lora hashes` entry, or one for all); None without it."""
        if text is None:
            return None
        try:
            weights = split_strengths(text.strip().strip("[]"))
        except ValueError:
            self.note(f"Lora weights '{_short(text, 40)}' are not numbers: 1 is used for each LoRA")
            return [1.0] * count
        if len(weights) == 1:
            return weights * count
        if len(weights) != count:
            self.note(f"Lora weights '{_short(text, 40)}' give {len(weights)} strengths for {count} LoRAs: 1 is used for each")
            return [1.0] * count
        return weights

    def _civitai_resources(self, known: set[str]) -> None:
        """`Civitai resources: [...]` (CivitAI's generator): the LoRAs and embeddings it names that nothing else did."""
        self.used.add("civitai resources")
        resources = _json_value(self.params.get("Civitai resources"), list)
        for item in resources:
            if not isinstance(item, dict):
                continue
            kind = str(item.get("type", "")).lower()
            name = str(item.get("modelName") or item.get("name") or "?")
            if kind in ("lora", "locon", "lycoris", "dora") and _fold(name) not in known:
                weight = f", weight {item['weight']}" if "weight" in item else ""
                version = f", version {item['modelVersionName']}" if item.get("modelVersionName") else ""
                self.note(
                    f"LoRA '{name}'{version}{weight} is named only in Civitai resources (by its CivitAI page, not its file): "
                    "not applied; tag it in the prompt with its registry id"
                )
            elif kind in ("embed", "embedding", "textualinversion") and _fold(name) not in known:
                self.note(f"embedding '{name}' is named only in Civitai resources: not applied; set embeddings_model")

    # -- embeddings

    def _embeddings(self) -> None:
        self.used.add("ti hashes")
        catalog = self.catalogs["embeddings"]
        named = dict(self.params.ti_hashes)
        for key, digest in self.hashes.items():
            if key.startswith("embed:") and key[6:] not in named:
                named[key[6:]] = digest
        ids = []
        for name, digest in named.items():
            found, how = catalog.find(name, [digest, self.hashes.get("embed:" + name)])
            if not found:
                self.note(f"embedding '{name}'{_hash_text(digest)} matches no registry embedding by hash or name: not applied")
                continue
            self._name_match_note("embedding", name, found, how, digest)
            if found.id not in ids:
                ids.append(found.id)
            if found.id != name:
                self.note(
                    f"embedding '{name}' is registry '{found.id}': the prompt calls it '{name}', so give that entry "
                    f"token: {name} (unless it has that token already)"
                )
        if ids:
            self.request["embeddings_model"] = ",".join(ids)

    # -- what the request cannot do

    def _passes(self) -> None:
        settings = [(k, _key(k), v) for k, v in self.params.settings.items()]
        size = f"{self.request['width']}x{self.request['height']}" if "width" in self.request else "the request's size"
        hires = [(k, v) for k, f, v in settings if f.startswith("hires ") or f in ("first pass size", "hr scale")]
        if hires:
            denoise = [(k, v) for k, f, v in settings if f == "denoising strength"]
            self.note(f"Hires fix ({_pairs(hires + denoise)}) is not applied: lora-sweep generates at {size}")
            self.used |= {_key(k) for k, _ in hires} | {"denoising strength"}
        img2img = [(k, v) for k, f, v in settings if f in IMG2IMG_KEYS and f not in self.used]
        if img2img:
            self.note(f"img2img/inpainting settings ({_pairs(img2img)}) are not applied: lora-sweep generates text-to-image, from noise")
            self.used |= {_key(k) for k, _ in img2img}
        units: dict[str, list[tuple[str, str]]] = {}
        for k, f, v in settings:
            if f.startswith("adetailer ") and f != "adetailer version":
                m = UNIT_SUFFIX.search(k)
                units.setdefault(m.group(1) if m else "1st", []).append((k, v))
                self.used.add(f)
        for unit, items in units.items():
            by = {UNIT_SUFFIX.sub("", _key(k))[len("adetailer ") :]: v for k, v in items}
            shown = [f"model {by['model']}"] if "model" in by else []
            shown += [f"prompt '{_short(by['prompt'], 50)}'"] if by.get("prompt") else []
            shown += [f"denoising strength {by['denoising strength']}"] if "denoising strength" in by else []
            more = len(items) - len(shown)
            shown += [f"{more} more setting{'s' if more != 1 else ''}"] if more > 0 else []
            label = "ADetailer" if unit == "1st" else f"ADetailer {unit} unit"
            self.note(f"{label} ({', '.join(shown)}) is not applied: lora-sweep has no detailer (inpainting) pass")
        for keys, what, why in (
            (REFINER_KEYS, "Refiner", "lora-sweep runs one model for all steps"),
            (VARIATION_KEYS, "Variation seed", "lora-sweep draws the noise from the seed alone"),
            (HYPERNET_KEYS, "Hypernetwork", "lora-sweep has no hypernetworks"),
        ):
            found = [(k, v) for k, f, v in settings if f in keys and DEFAULTS.get(f) != v.strip().lower()]
            self.used |= {f for _, f, _ in settings if f in keys}
            if found:
                self.note(f"{what} ({_pairs(found)}) is not applied: {why}")

    def _rest(self) -> None:
        for key, value in self.params.settings.items():
            folded = _key(key)
            if folded in self.used or folded in INFORMATIONAL:
                continue
            if DEFAULTS.get(folded) is not None and value.strip().lower().startswith(DEFAULTS[folded]):
                continue
            if folded.startswith("controlnet"):
                self.note(f"{key} ({_short(value, 80)}) is not applied: lora-sweep has no ControlNet")
            elif folded == "face restoration":
                self.note(f"Face restoration ({value}) is not applied: lora-sweep does not restore faces")
            else:
                why = REASONS.get(folded, "lora-sweep has no such setting")
                self.note(f"'{key}: {_short(value, 80)}' is not applied: {why}")


def _pairs(items: list[tuple[str, str]]) -> str:
    return ", ".join(f"{k} {_short(v, 40)}" for k, v in items)


def _hash_text(digest: str | None) -> str:
    return f" (hash {digest.strip().lower()})" if digest and digest.strip() else ""


def _legacy(digest: str | None, kind: str) -> str:
    digest = (digest or "").strip()
    if kind == "models" and len(digest) == 8 and HEX.match(digest.lower()):
        return " (an 8-digit Model hash is A1111's old AutoV1, of 64 KiB of the file, which no sha256 can be compared with)"
    return ""


# ---------------------------------------------------------------- files


def read_parameters(path: str | Path) -> str | None:
    """The `parameters` text of an image: a PNG's text chunk, or the EXIF UserComment of a JPEG/WebP (as A1111 writes them).

    None when the image has none; a missing or unreadable file raises (OSError, PIL.UnidentifiedImageError).
    """
    from PIL import Image

    with Image.open(path) as image:
        for key, value in image.info.items():
            if isinstance(key, str) and key.lower() == "parameters":
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                if text.strip():
                    return text
        comment = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
        text = _user_comment(comment)
        if text and text.strip():
            return text
        legacy = image.info.get("comment")  # a JPEG COM segment, from some exporters
        if isinstance(legacy, bytes):
            legacy = legacy.decode("utf-8", "replace")
        if isinstance(legacy, str) and "Steps:" in legacy:
            return legacy
    return None


def _user_comment(value: Any) -> str | None:
    """EXIF UserComment bytes -> text: an 8-byte charset header ('UNICODE\\0' is UTF-16, either byte order, 'ASCII\\0\\0\\0')."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes) or not value:
        return None
    head, body = value[:8], value[8:]
    if head.startswith(b"UNICODE"):
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", "replace")
        big_endian = len(body) >= 2 and body[0] == 0 and body[1] != 0
        return body.decode("utf-16-be" if big_endian else "utf-16-le", "replace").rstrip("\x00")
    if head.startswith((b"ASCII", b"\x00" * 8)):
        return body.decode("utf-8", "replace").rstrip("\x00")
    return value.decode("utf-8", "replace").rstrip("\x00")


def tensor_data_hash(path: str | Path) -> str:
    """A .safetensors file's sha256 of everything after its JSON header: the hash A1111 writes in `Lora hashes` (AutoV3).

    Give its first digits as the third item of a registry_files LoRA entry to match A1111's LoRA hashes by hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
