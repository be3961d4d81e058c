"""Training configs: YAML validated by pydantic at load, with errors that name the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from matta.config import ModelConfig
from matta.configfile import read_yaml, validate

Recipe = Literal["teacher", "matta", "student", "kd"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Architecture of the model a run trains (see matta.config.ModelConfig)."""

    name: str = "matta"
    vocab_size: int | None = Field(None, gt=0, description="default: the data's tokenizer size")
    n_ctx: int = Field(256, gt=0)
    d_model: int = Field(128, gt=0)
    n_layer: int = Field(4, gt=0)
    n_head: int = Field(2, gt=0)
    widths: dict[str, int] = Field(default_factory=lambda: {"s": 32, "m": 128, "l": 384, "ta": 1024})
    family: Literal["gpt2", "llama", "qwen2", "mistral"] = Field(
        "gpt2", description="gpt2: NestedGPT; llama/qwen2/mistral: NestedLlama (RMSNorm, RoPE, GQA, SwiGLU), "
                            "exported as that HF family")
    n_kv_head: int | None = Field(None, gt=0, description="Llama family: key/value heads (GQA); default n_head")
    rope_theta: float | None = Field(None, gt=0, description="Llama family: RoPE base (default 10000)")
    qkv_bias: bool | None = Field(None, description="Llama family: q/k/v biases (family qwen2 needs them)")
    tie_embeddings: bool | None = Field(None, description="Llama family: LM head = token embedding (default true)")

    def build(self, vocab_size: int, eos_token_id: int) -> ModelConfig:
        llama = {k: v for k, v in (("n_kv_head", self.n_kv_head), ("rope_theta", self.rope_theta),
                                   ("qkv_bias", self.qkv_bias), ("tie_embeddings", self.tie_embeddings))
                 if v is not None}
        return ModelConfig(
            vocab_size=self.vocab_size or vocab_size, n_ctx=self.n_ctx, d_model=self.d_model,
            n_layer=self.n_layer, n_head=self.n_head, widths=dict(self.widths),
            eos_token_id=eos_token_id, name=self.name, family=self.family, **llama,
        )


class LossSpec(_Strict):
    """MatTA loss. "Teacher labels" = (1 - label_mix) * CE(ground truth) + label_mix * T^2 KL(teacher || model)."""

    ta_weight: float = Field(1.0, ge=0, description="weight of the TA's loss against teacher labels")
    student_weight: float = Field(1.0, ge=0, description="weight of the Student's loss against teacher labels")
    distill_weight: float = Field(1.0, ge=0, description="beta: TA -> Student distillation on softened logits")
    distill_ramp_steps: int = Field(0, ge=0, description="beta rises linearly from 0 over this many steps")
    temperature: float = Field(2.0, gt=0)
    label_mix: float = Field(0.5, ge=0, le=1, description="0 = ground truth only, 1 = teacher soft labels only")
    middle_widths: int = Field(1, ge=0, description="intermediate widths sampled into each step (MatFormer)")
    middle_weight: float = Field(1.0, ge=0)


class OptimSpec(_Strict):
    name: Literal["adamw", "soap", "shampoo"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class TeacherSpec(_Strict):
    """The frozen teacher: a matta checkpoint or a local HF causal-LM directory.

    With ``train`` set and nothing at ``path`` yet, the teacher run is trained first.
    """

    path: Path
    width: str | int | None = Field(None, description="width of a matta teacher checkpoint (default: full)")
    train: TrainConfig | None = None


class TrainConfig(_Strict):
    recipe: Recipe
    data: Path = Field(description="a directory written by `matta data prepare`")
    out: Path = Field(description="the checkpoint directory to write")
    run_dir: Path | None = Field(None, description="metrics and resume state (default: runs/<out name>)")
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    init_from: Path | None = Field(None, description="start from this matta checkpoint's weights, architecture "
                                   "and widths (e.g. one `matta elastify` wrote) instead of a random "
                                   "`model:`; recipe 'matta' only")
    teacher: TeacherSpec | None = None
    loss: LossSpec = Field(default_factory=LossSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=0, description="global batch, in sequences")
    seq_len: int = Field(128, gt=1)
    eval_every: int = Field(250, ge=0, description="0 disables periodic eval")
    eval_batches: int = Field(20, gt=0)
    save_every: int = Field(250, ge=0, description="resume state every N steps; 0 only at the end")
    log_every: int = Field(10, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = Field(False, description="torch.compile the step (model + loss) and the teacher: "
                          "~1 min of compiling, then faster steps; off for short runs and tests")
    final_eval: bool = True
    cloze_items: int = Field(3000, ge=0)
    chat_template: Path | None = Field(None, description="a jinja chat template file the checkpoint ships as "
                                       "chat_template.jinja (e.g. serving/api/templates/chatml.jinja); default: "
                                       "init_from's, if it has one")
    description: str = ""

    @field_validator("model")
    @classmethod
    def _model_checks(cls, spec: ModelSpec) -> ModelSpec:
        spec.build(spec.vocab_size or 2, 0)
        return spec

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        if self.init_from is not None:
            if self.recipe != "matta":
                raise ValueError(f"init_from needs recipe 'matta', got {self.recipe!r}")
            if "model" in self.model_fields_set:
                raise ValueError("give `init_from:` or `model:`, not both: the architecture and widths come from "
                                 f"the checkpoint {str(self.init_from)!r}")
        if self.recipe in ("matta", "kd") and self.teacher is None:
            raise ValueError(f"recipe {self.recipe!r} needs a `teacher:` section")
        if self.recipe in ("teacher", "student") and self.teacher is not None:
            raise ValueError(f"recipe {self.recipe!r} trains on ground truth only; remove `teacher:`")
        if self.recipe == "teacher" and len(self.model.widths) != 1:
            raise ValueError(f"a teacher is dense: give model.widths one entry, got {self.model.widths}")
        if self.recipe in ("student", "kd") and len(self.model.widths) != 1:
            raise ValueError(f"recipe {self.recipe!r} trains one Student-sized model: one width, got {self.model.widths}")
        if self.recipe == "matta" and len(self.model.widths) < 2:
            raise ValueError(f"recipe 'matta' needs a Student and a TA width, got {self.model.widths}")
        if self.init_from is None and self.seq_len > self.model.n_ctx:
            raise ValueError(f"seq_len {self.seq_len} exceeds model.n_ctx {self.model.n_ctx}")
        if self.chat_template is not None and not self.chat_template.is_file():
            raise ValueError(f"chat_template {str(self.chat_template)!r}: no such file")
        if self.teacher is not None and self.teacher.train is not None and self.teacher.train.recipe != "teacher":
            raise ValueError(f"teacher.train must use recipe 'teacher', got {self.teacher.train.recipe!r}")
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return self.run_dir or Path("runs") / self.out.name


TeacherSpec.model_rebuild()


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a YAML config; relative paths inside stay relative to the CWD."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    data.update(overrides or {})
    return validate(TrainConfig, data, str(path))
