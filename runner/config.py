"""Structured configs: the schema Hydra validates every YAML file and override against.

Groups mirror the code: `model/` -> registry, `engine/` -> engines, `tracking/` -> tracking,
`sweep/` (the files in sweeps/) -> plan. Request fields inside `sweep.base` and `sweep.grid` are
left open here and checked by `runner.request`, which knows the spec's loose types and gives
one-line errors with "did you mean".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"  # the config groups Hydra composes (model/, engine/, tracking/, scores/, config.yaml)
SECRET_KEY = re.compile(r"(^|_)(key|api_key|secret|token|password)$", re.IGNORECASE)


# the remote engine's timeouts and retries: plain data, shared by the schema (engine.*) and the client
@dataclass
class Policy:
    """Timeouts and retries; seconds. Tests shrink them, users rarely need to."""

    request_timeout_s: float = 60.0
    deadline_s: float = 300.0
    eta_min_s: float = 1.0
    eta_max_s: float = 10.0
    poll_initial_s: float = 3.0
    poll_max_s: float = 10.0
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 80.0
    max_rate_limit_retries: int = 8
    max_transient_retries: int = 5


@dataclass
class ModelSource:
    """Where a model comes from: a diffusers folder, a single-file checkpoint or a hub id (local cache only)."""

    source: str = "???"
    variant: str | None = None  # e.g. fp16: load *.fp16.safetensors (picked automatically when only they exist)
    config: str | None = None  # single-file checkpoints: a diffusers folder or cached hub id for the configs
    builtin: bool = False  # the project builds it into paths.assets when missing (the demo model)
    lcm: bool = False  # LCM-distilled weights (LCMScheduler is meant for them)


@dataclass
class LoraSource:
    """A LoRA file (or folder + weight_name, or hub id + weight_name)."""

    source: str = "???"
    weight_name: str | None = None
    builtin: bool = False
    lcm: bool = False  # an LCM LoRA (LCMScheduler is meant for it)
    trigger: str | None = None  # its trigger words (else the file's metadata says them, if it does)


@dataclass
class VaeSource:
    """A separate VAE for the request's `vae` field: an AutoencoderKL folder or a single file."""

    source: str = "???"
    config: str | None = None  # single files: an AutoencoderKL folder for the configs (default: the model's vae/)


@dataclass
class EmbeddingSource:
    """Textual inversion for the request's `embeddings_model` field (A1111 .pt/.safetensors or diffusers)."""

    source: str = "???"
    token: str | None = None  # the word that calls it in prompts; default: its id, as in the web UIs


@dataclass
class ScorerSource:
    """A scorer's files (`scorers:` registry): a CLIP model, or a learned head that reads CLIP image embeddings."""

    source: str = "???"  # a folder, a cached hub id (CLIP), or a weights file (learned heads)
    kind: str = "clip"  # clip | aesthetic | package.module:Class (your own learned scorer, see runner/scores/learned.py)
    clip: str | None = None  # learned heads: the scorers: id of the CLIP whose image embeddings they read
    builtin: bool = False


@dataclass
class ScoresConfig:
    """How the scores of `sweep.scores` are computed (after generation, on their own stage)."""

    clip: str = "tiny-clip"  # the scorers: id of the CLIP for clip_score, lora_effect and seed_spread
    batch_size: int = 32
    device: str = "auto"  # auto | cpu | cuda ...


@dataclass
class UpscalerConfig:
    """The 2x upscaler behind the request's `upscale: yes` (a diffusers StableDiffusionLatentUpscalePipeline)."""

    source: str | None = None  # folder or cached hub id, e.g. stabilityai/sd-x2-latent-upscaler
    num_inference_steps: int = 20
    guidance_scale: float = 0.0


@dataclass
class ModelConfig:
    id: str = "tiny-sd"  # the default request model_id


@dataclass
class EngineConfig(Policy):
    """Both engines' settings; the remote engine's timeouts and retries are its `Policy` fields."""

    kind: str = "local"  # local | remote
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16
    batch_size: Any = "auto"  # seeds of one cell in one call: a number, or auto (from free GPU memory; 4 on CPU)
    max_batch_size: int = 32  # the most batch_size: auto picks
    fuse_loras: Any = "auto"  # fuse each blend into the base weights for its group (auto: on; false: peft adapters per step)
    channels_last: Any = "auto"  # channels-last UNet and VAE (auto: on CUDA)
    compile: bool = False  # torch.compile the UNet and VAE decoder (minutes of warm-up per image size; see README)
    compile_mode: str | None = None  # torch.compile mode: None (default), max-autotune, max-autotune-no-cudagraphs
    workers: int = 1  # local engine on N Ray workers (one GPU each on a cluster; RAY_ADDRESS, else a local Ray)
    substitute_schedulers: bool = False  # run a documented substitute for non-generator schedulers
    cache_prompt_embeddings: bool = True
    offload: str = "none"  # none | model | sequential: components on the GPU only while they run (CUDA; big DiTs on small cards)
    quantize: str = "none"  # none | bnb-4bit | bnb-8bit | torchao-int8: the denoiser quantized at load (CUDA; blends then unfused)
    # remote engine (engine=remote): the provider's text2img API, or `lora-sweep serve`
    base_url: str = "https://modelslab.com"
    api_key_env: str = "MODELSLAB_API_KEY"  # the key is read from this environment variable...
    api_key_file: str | None = None  # ...or from this file; never from YAML
    max_in_flight: int = 5  # the provider's smallest queue
    max_steps: int = 50  # num_inference_steps above this are clamped (and recorded), not refused


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # any MLflow URI; default sqlite:///<paths.outputs>/mlflow.db
    artifact_location: str | None = None  # default <paths.outputs>/mlartifacts for new experiments
    experiment: str | None = None  # default: the sweep name
    queue_size: int = 64  # images waiting for the background writer before generation waits
    chart_images: bool = True  # also log each image with mlflow's log_image under the key `image` (chart view; bench/RESULTS.md)


@dataclass
class GridAxes:
    x: str | None = "lora_strength"
    y: str | None = "lora_model"
    page: str | None = None  # a third axis: one grid page per value (other axes still split pages)


@dataclass
class ReportConfig:
    grid: GridAxes = field(default_factory=GridAxes)
    cell_size: int = 128  # pixels of the long side of each image in a grid (shrunk to fit max_grid_pixels)
    max_grid_pixels: int = 40_000_000  # one grid image never exceeds this (PIL refuses images over ~89 MP)
    baseline: bool = False  # add the no-LoRA row of every cell, so lora_effect has a reference
    rank_by: str | None = None  # the score the ranking sorts by (default: the first of sweep.scores that rates one image)


@dataclass
class SearchConfig:
    """`search:` in a sweep file: find the best setting for a score with Optuna instead of a full grid (runner/search/)."""

    space: dict[str, Any] = field(default_factory=dict)  # field -> [low, high] | {low, high, step, log} | [choices] | {choices}
    objective: str = ""  # a score of sweep.scores, `human` (people's votes), or an expression of them: clip_score - 0.5 * seed_spread
    direction: str = "maximize"  # maximize | minimize
    seeds: Any = field(default_factory=lambda: [0, 1])  # every trial is judged on these seeds (a list or {range: [a, b]})
    trials: int = 20
    batch: int = 4  # trials asked at once and generated as one workload
    sampler: str = "tpe"  # tpe | cmaes | random | grid
    sampler_seed: int = 0  # the same seed, space and scores ask the same trials
    compare_grid: bool = False  # also run a grid of at most `trials` settings over the space, reported beside the search
    votes_per_trial: int | None = None  # objective `human`: the votes each trial waits for before it is told (default 5)


@dataclass
class SweepConfig:
    name: str = "???"
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    base_from: str | None = None  # an image whose A1111/Forge `parameters` text starts the base request (base: wins)
    grid: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)  # empty space: a grid sweep
    report: ReportConfig = field(default_factory=ReportConfig)
    scores: list[str] = field(default_factory=list)  # clip_score, lora_effect, seed_spread, or a learned scorer's id
    max_images: int = 5000  # refuse larger plans unless raised
    trigger_mode: str = "prepend"  # prepend | none: a LoRA's trigger words where the prompt has no {trigger}


@dataclass
class ValidationConfig:
    max_lora_strength: float = 1.0  # the spec's limit; local sweeps may raise it to 2


@dataclass
class PathsConfig:
    outputs: str = "outputs"
    assets: str = "outputs/assets"


@dataclass
class ServeConfig:
    """`lora-sweep serve`: the text2img API over the local engine (README, "Serving")."""

    host: str = "127.0.0.1"  # 0.0.0.0 to serve a network: then keys are required
    port: int = 7860
    name: str = "served"  # the folder under paths.outputs: images/, results, jobs.db
    api_keys_env: str = "LORA_SWEEP_API_KEYS"  # comma-separated keys in this environment variable...
    api_keys_file: str | None = None  # ...and/or a file of sha256 hashes of keys, one per line
    allow_no_auth: bool = False  # loopback only: serve without keys (a local tool, never a network service)
    allow_webhooks: bool = False  # POST results to the request's webhook URL (off: a server must not reach a private network for a caller)
    webhook_timeout_s: float = 10.0
    max_queued_per_key: int = 5  # queued + running requests per key; beyond that the rate-limit reply with retry_after
    wait_s: float = 3.0  # a request finishing within this answers success at once; otherwise processing + eta
    max_batch_images: int = 32  # images taken from the queue for one engine call (the engine batches equal cells)
    max_body_bytes: int = 65536  # larger request bodies are refused (413) before they are read
    max_steps: int = 150  # num_inference_steps above this are clamped, as the provider does, not refused
    public_url: str | None = None  # the base of image URLs in replies (default: the URL the request came to)


@dataclass
class CompareConfig:
    """`lora-sweep compare FOLDER`: the blind pairwise voting page on a sweep's images (README, "Voting")."""

    host: str = "127.0.0.1"  # another address (0.0.0.0 for a network) needs tokens
    port: int = 7870
    tokens_env: str = "LORA_SWEEP_COMPARE_TOKENS"  # comma-separated tokens in this environment variable...
    tokens_file: str | None = None  # ...and/or a file of sha256 hashes of tokens, one per line (as serve.api_keys_file)
    max_body_bytes: int = 4096  # a vote is a few hundred bytes; larger bodies are refused (413) before they are read
    voter: str = "anonymous"  # the name of votes from a page where no name was typed
    bootstrap: int = 50  # resamples of the Bradley-Terry fit that picks the next pair (in the background)


@dataclass
class Config:
    sweep: SweepConfig = field(default_factory=SweepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # id -> ModelSource / LoraSource fields. Open maps (checked by runner.registry) so that an entry
    # can be added from the command line: +loras.mine={source: /path/mine.safetensors}
    models: dict[str, Any] = field(default_factory=dict)
    loras: dict[str, Any] = field(default_factory=dict)
    vaes: dict[str, Any] = field(default_factory=dict)  # id -> VaeSource fields
    embeddings: dict[str, Any] = field(default_factory=dict)  # id -> EmbeddingSource fields
    upscaler: UpscalerConfig = field(default_factory=UpscalerConfig)
    scorers: dict[str, Any] = field(default_factory=dict)  # id -> ScorerSource fields
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    retry_failed: bool = False  # only run the ids that failed before
    progress: bool = True


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lora_sweep_schema", node=Config)


def redact(config: Any) -> Any:
    """The config with every secret-looking value replaced, for saving and logging."""
    if isinstance(config, dict):
        # secrets are strings: `serve.max_queued_per_key: 5` is a number, not a key
        return {k: ("***" if SECRET_KEY.search(str(k)) and isinstance(v, str) and v else redact(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def config_yaml(cfg: DictConfig) -> str:
    """The composed config as saved in the sweep folder (config.yaml) and on the MLflow parent: secrets redacted."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))))


def sweep_folder(cfg: DictConfig) -> Path:
    return Path(cfg.paths.outputs) / cfg.sweep.name
