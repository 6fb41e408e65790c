"""Is this run launchable? The one answer that `dtrain check`, `dtrain train`, `dtrain submit` and every rank's
entry point get, so that nothing that `check` would refuse ever starts a process or a job.

Everything here reads files only (the config, the model's config.json, the checkpoint folder): no weights are
loaded and no process group exists.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass

from dtrain import hub, strategies
from dtrain.config import Config, ConfigError, load_config
from dtrain.reporters import missing_packages
from dtrain.resume import ResumePlan, plan_resume


@dataclass(frozen=True)
class Launch:
    """Where and how the run will go: nodes x ranks per node."""

    nnodes: int
    nproc_per_node: int
    local: bool = True
    """Started on this machine (dtrain train, a rank): what it lacks, the run lacks. False for submit, where the
    compute nodes may have what the login node does not (a GPU)."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass(frozen=True)
class Preflight:
    cfg: Config
    launch: Launch
    resume: ResumePlan


def preflight(config: str, overrides: list[str], launch: Launch) -> Preflight:
    """Every check, all problems in one ConfigError."""
    problems = launch_problems(launch)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise ConfigError(problems + e.problems, config) from e
    strategy = strategies.get(cfg.strategy)
    problems += strategy.layout_problems(cfg, launch.nnodes)
    unresolved = hub_problems(cfg)
    model_problems = unresolved or model_file_problems(cfg)  # a repo id must be in the cache to read its files
    problems += model_problems
    if not any(p.startswith("model.path") for p in model_problems):  # builds the model from config.json
        problems += strategy.model_problems(cfg)
    problems += missing_packages(cfg.logging.report_to)
    problems += attention_problems(cfg, launch)
    problems += [] if unresolved else chat_template_problems(cfg)
    if problems:
        raise ConfigError(problems, config)
    try:
        resume = plan_resume(cfg, launch.world_size)
    except ConfigError as e:
        raise ConfigError(e.problems, config) from e
    return Preflight(cfg, launch, resume)


def hub_problems(cfg: Config) -> list[str]:
    """Resolve every Hub repo id of the run. Where check / prepare / submit run this downloads into the Hugging Face
    cache; on the ranks (HF_HUB_OFFLINE) it only finds them there."""
    wanted = [("model.path", cfg.model.path, cfg.model.revision, "model")]
    if cfg.model.tokenizer_path:
        wanted.append(("model.tokenizer_path", cfg.model.tokenizer_path, None, "model"))
    for key, ds in cfg.dataset_entries():
        wanted.append((f"{key}.path", ds.path, ds.revision, "dataset"))
    problems = []
    for key, path, revision, repo_type in wanted:
        if path and hub.is_hub_id(path):
            try:
                hub.resolve(path, revision, repo_type)
            except hub.HubError as e:
                problems.append(f"{key}: {e}")
    return problems


def launch_problems(launch: Launch) -> list[str]:
    problems = []
    if launch.nnodes < 1:
        problems.append(f"--nodes: must be >= 1, got {launch.nnodes}")
    if launch.nproc_per_node < 1:
        problems.append(f"--nproc: ranks per node must be >= 1, got {launch.nproc_per_node}")
    return problems


def model_file_problems(cfg: Config) -> list[str]:
    """What the model's and tokenizer's own files say: code the run would have to execute, too few positions."""
    config_file = cfg.model.local_dir() / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        return [f"model.path: {config_file} is not a readable JSON file ({e})"]
    problems = []
    trust = " (set model.trust_remote_code: true if you trust that code)"
    if "auto_map" in config and not cfg.model.trust_remote_code:
        problems.append(
            f"model.path: {cfg.model.path} needs its own modelling code (auto_map in config.json); dtrain runs "
            f"only architectures that transformers ships unless told otherwise{trust}"
        )
    tokenizer_config = cfg.model.tokenizer_dir() / "tokenizer_config.json"
    tokenizer_code = tokenizer_config.is_file() and "auto_map" in json.loads(tokenizer_config.read_text() or "{}")
    if tokenizer_code and not cfg.model.trust_remote_code:
        key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
        problems.append(f"{key}: the tokenizer needs its own code (auto_map in {tokenizer_config}){trust}")
    problems += swap_buffer_problems(cfg, config, config_file)
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and cfg.data.seq_len > positions:
        problems.append(
            f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_position_embeddings {positions} ({config_file})"
        )
    return problems


def swap_buffer_problems(cfg: Config, config: dict, config_file) -> list[str]:
    """NVMe parameter offload sizes its swap buffers from the largest parameter, which the model's shape (read
    from config.json on every rank, ds_config.largest_parameter) knows for the families dtrain plans."""
    from dtrain.plan.shape import ModelShape

    if cfg.deepspeed.offload_param.device != "nvme":
        return []
    try:
        ModelShape.from_hf_config(config)
    except ValueError as e:
        return [
            f"deepspeed.offload_param.device: nvme sizes its swap buffers from the model's shape, unknown for "
            f"{config_file} ({e}); offload parameters to cpu"
        ]
    return []


def chat_template(cfg: Config) -> tuple[str, str | None]:
    """The chat template a run with chat data renders with, and the key that sets it; (key, None) without one."""
    if not any(ds.format == "chat" for _, ds in cfg.dataset_entries()):
        return "data.chat_template", None
    key, template = "data.chat_template", cfg.data.chat_template
    if template is None:
        key, template = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path", _tokenizer_template(cfg)
    return key, template if template and template.strip() else None  # none at all: the data layer says how to set one


def chat_template_problems(cfg: Config) -> list[str]:
    """A chat template with a Jinja syntax error is otherwise found only while preparing the data, inside a rank."""
    key, template = chat_template(cfg)
    if template is None:
        return []
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        return [f"{key}: line {e.lineno}: {e.message} (chat template syntax)"]
    return []


def _tokenizer_template(cfg: Config) -> str | None:
    folder = cfg.model.tokenizer_dir()
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config_file = folder / "tokenizer_config.json"
    template = json.loads(config_file.read_text() or "{}").get("chat_template") if config_file.is_file() else None
    if isinstance(template, list):  # named templates: the default one is what apply_chat_template uses
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def attention_problems(cfg: Config, launch: Launch) -> list[str]:
    """flash_attention_2 needs a flash-attn that imports (and, where the run starts here, a CUDA GPU): without them
    transformers fails inside every rank, after the job has started."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return []
    if importlib.util.find_spec("flash_attn") is None:
        return ["model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn)"]
    if launch.local:
        import torch

        if not torch.cuda.is_available():
            return ["model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on this machine"]
        from dtrain.attention import flash_attn_problem

        problem = flash_attn_problem()
        if problem is not None:
            return [f"model.attn_implementation: flash_attention_2 cannot run here: {problem}"]
    return []
